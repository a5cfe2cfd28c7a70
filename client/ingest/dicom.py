"""Read one CT study folder into a Hounsfield volume and its geometry.

The only module of the project that imports pydicom. It follows nnU-Net's reader contract:
``read_study(folder) -> StudyVolume(volume, geometry, problems)``; everything downstream sees numpy
arrays and the :class:`Geometry` dataclass. Conventions (axis order, LPS/RAS) are in
docs/design.md §8.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import AIR_HU

#: Positions closer than this (mm) along the slice normal are duplicates.
DUPLICATE_TOL_MM = 1e-3
#: Spacing between consecutive slices may deviate this much (relative) from the median.
UNEVEN_TOL = 0.05
#: Direction cosines of two slices of one series may differ this much.
ORIENTATION_TOL = 1e-4

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass(frozen=True)
class Problem:
    """One reason why a file (or a study, or a label row) could not be used as it is."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


class StudyError(Exception):
    """A study folder that yields no usable volume; ``problems`` names every file and reason."""

    def __init__(self, path: Path | str, reason: str, problems: Iterable[Problem] = ()):
        self.path = str(path)
        self.reason = reason
        self.problems = list(problems) or [Problem(self.path, reason)]
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a volume indexed ``[k, r, c]`` in DICOM patient coordinates (LPS, mm).

    ``origin``: ImagePositionPatient (0020,0032) of slice 0; ``row_dir``/``col_dir``: the two
    direction cosines of ImageOrientationPatient (0020,0037) (directions of increasing column and
    row index); ``slice_step``: vector from one slice to the next, measured from the positions
    (not SliceThickness); ``pixel_spacing``: PixelSpacing (0028,0030) = (between rows, between
    columns); ``shape`` = (K, R, C).
    """

    origin: tuple[float, float, float]
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    slice_step: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int, int]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.asarray(self.row_dir), np.asarray(self.col_dir))

    @property
    def slice_spacing(self) -> float:
        """Spacing between slices, measured from their positions along the slice normal (as DICOM
        defines SpacingBetweenSlices): |slice_step| for a straight stack, less for a gantry-tilted
        (sheared) one, so that pixel area x spacing is a voxel's volume
        (``common.metrics.hematoma_volume_ml``). Not SliceThickness: overlapping or gapped
        reconstructions make it differ from the spacing between slices (only a one-slice series, with
        no neighbour to measure from, falls back on the header)."""
        return float(abs(np.dot(np.asarray(self.slice_step), self.normal)))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice, row, column) spacing in mm, in the order of the array axes."""
        return (self.slice_spacing, float(self.pixel_spacing[0]), float(self.pixel_spacing[1]))

    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping (k, r, c, 1) to LPS millimetres."""
        a = np.eye(4)
        a[:3, 0] = np.asarray(self.slice_step)
        a[:3, 1] = np.asarray(self.col_dir) * self.pixel_spacing[0]
        a[:3, 2] = np.asarray(self.row_dir) * self.pixel_spacing[1]
        a[:3, 3] = np.asarray(self.origin)
        return a

    def affine_ras(self) -> np.ndarray:
        """4x4 matrix mapping (k, r, c, 1) to RAS+ millimetres (NIfTI's world space)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(**{k: tuple(v) for k, v in d.items()})


@dataclass(frozen=True)
class StudyVolume:
    """A readable study: HU volume ``[k, r, c]`` (float32), its geometry, and non-fatal problems.

    ``sources``: the file of each slice, in the volume's order, so that results written back as DICOM
    (client/inference/dicom_results.py) can reference the exact source instance of every slice.
    ``skipped_localizers``: how many of ``problems`` are localizers left out (each named there).
    """

    volume: np.ndarray
    geometry: Geometry
    problems: tuple[Problem, ...] = ()
    skipped_localizers: int = 0
    sources: tuple[Path, ...] = ()


@dataclass
class _Slice:
    path: Path
    ds: object  # pydicom Dataset, kept private to this module
    position: np.ndarray
    orientation: np.ndarray


def list_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file below ``folder`` (DICOM files may have any name)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _read_header(path: Path) -> tuple[object | None, Problem | None]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        return None, Problem(str(path), f"not a DICOM file ({exc})")
    except Exception as exc:  # truncated headers raise EOFError/OSError/ValueError/struct errors
        return None, Problem(str(path), f"unreadable DICOM file ({type(exc).__name__}: {exc})")
    if len(ds) == 0:  # pydicom stops quietly at end of file: nothing after the file meta header
        return None, Problem(str(path), "truncated DICOM file (no data elements after the file meta header)")
    return ds, None


#: Tags that place a file in its patient, study and series (read without the pixel data).
SERIES_ID_TAGS: tuple[str, ...] = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_UI_WARNING = "Invalid value for VR UI"


class _NoUiWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_UI_WARNING)


@contextmanager
def _quiet_nonconforming_uids():
    """Public data sets use non-conforming UIDs (RSNA's ``ID_<hex>``); they identify all the same,
    so pydicom's warning (and log line) about the UI value representation is not repeated per file."""
    logger, quiet = logging.getLogger("pydicom"), _NoUiWarning()
    logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_UI_WARNING)
            yield
    finally:
        logger.removeFilter(quiet)


@_quiet_nonconforming_uids()
def read_series_ids(path: Path | str) -> tuple[dict[str, str] | None, Problem | None]:
    """PatientID (0010,0020), StudyInstanceUID (0020,000D), SeriesInstanceUID (0020,000E) and
    SOPInstanceUID (0008,0018) of one file, read without its pixel data; or the problem."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(SERIES_ID_TAGS))
        ids = {tag: str(ds.get(tag, "") or "").strip() for tag in SERIES_ID_TAGS}
    except InvalidDicomError as exc:
        return None, Problem(str(path), f"not a DICOM file ({exc})")
    except Exception as exc:  # truncated headers raise EOFError/OSError/ValueError/struct errors
        return None, Problem(str(path), f"unreadable DICOM file ({type(exc).__name__}: {exc})")
    missing = [tag for tag, value in ids.items() if not value]
    if missing:
        return None, Problem(str(path), f"missing {', '.join(missing)}: the file cannot be placed in a series")
    return ids, None


def read_acquisition(folder: Path | str) -> tuple[str, float | None]:
    """The scanner (``Manufacturer ManufacturerModelName``, "unknown" if absent) and the slice
    thickness in mm (SpacingBetweenSlices, else SliceThickness) of a study folder's first readable
    file, for the data census; header only, no pixel data, no other tag."""
    import pydicom

    for path in list_files(Path(folder)):
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["Manufacturer", "ManufacturerModelName", "SpacingBetweenSlices", "SliceThickness"],
            )
        except Exception:  # noqa: BLE001 - not DICOM or unreadable: `check` reports it; try the next file
            continue
        name = " ".join(str(ds.get(t, "") or "").strip() for t in ("Manufacturer", "ManufacturerModelName")).strip()
        thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
        return name or "unknown", float(thickness) if thickness else None
    return "unknown", None


def localizer_type(ds) -> str | None:
    """The ImageType (0008,0008) value that marks a scout/localizer (LOCALIZER or SCOUT), else None."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return next((v for v in ("LOCALIZER", "SCOUT") if v in image_type), None)


def is_localizer(ds) -> bool:
    """Scouts/localizers (ImageType (0008,0008) value 3 LOCALIZER) are not part of the axial series."""
    return localizer_type(ds) is not None


def _localizer_problem(path: Path, ds) -> Problem | None:
    """A localizer is left out like any other unusable file, and named, so that a site can tell why
    its slice count differs from the PACS (even when it shares the axial series' SeriesInstanceUID)."""
    kind = localizer_type(ds)
    if kind is None:
        return None
    return Problem(str(path), f"localizer (ImageType {kind}): not part of the axial series, left out")


def _check_ct_slice(path: Path, ds) -> Problem | None:
    modality = str(ds.get("Modality", "")).upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    is_ct = modality == "CT" if modality else sop_class in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)
    if not is_ct:
        return Problem(str(path), f"not a CT image (Modality={modality or 'missing'})")
    if "PixelData" not in ds:
        return Problem(str(path), "no pixel data (PixelData (7FE0,0010) missing)")
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if tag not in ds or ds.get(tag) in (None, ""):
            return Problem(str(path), f"missing geometry tag {tag}")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return Problem(str(path), "multi-frame images are not supported (one axial slice per file expected)")
    return None


def to_hounsfield(
    stored: np.ndarray, slope: float, intercept: float, padding: tuple[float, float] | None
) -> np.ndarray:
    """HU = stored value x RescaleSlope (0028,1053) + RescaleIntercept (0028,1052).

    Pixels equal to PixelPaddingValue (0028,0120) (or inside [value, PixelPaddingRangeLimit
    (0028,0121)]) and everything below air (out-of-field values such as -2048 or -3024) become air.
    """
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if padding is not None:
        lo, hi = min(padding), max(padding)
        hu[(stored >= lo) & (stored <= hi)] = AIR_HU
    np.maximum(hu, AIR_HU, out=hu)
    return hu


def _padding_range(ds) -> tuple[float, float] | None:
    if "PixelPaddingValue" not in ds:
        return None
    value = float(ds.PixelPaddingValue)
    limit = ds.get("PixelPaddingRangeLimit")
    return (value, float(limit)) if limit is not None else (value, value)


def _decode(path: Path, ds) -> tuple[np.ndarray | None, Problem | None]:
    try:
        stored = ds.pixel_array
    except Exception as exc:  # no decoder for the transfer syntax, truncated pixel data, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        return None, Problem(str(path), f"pixel data could not be decoded (transfer syntax {name}): {exc}")
    if stored.ndim != 2:
        return None, Problem(str(path), f"expected a 2-D slice, got pixel array of shape {stored.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return to_hounsfield(stored, slope, intercept, _padding_range(ds)), None


def _group_series(slices: list[_Slice]) -> dict[str, list[_Slice]]:
    groups: dict[str, list[_Slice]] = defaultdict(list)
    for s in slices:
        groups[str(s.ds.get("SeriesInstanceUID", "unknown"))].append(s)
    return groups


def _sort_and_check(folder: Path, series: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """Sort by position along the slice normal and check spacing; returns slices and the step vector."""
    ref = series[0].orientation
    odd = [s for s in series if np.abs(s.orientation - ref).max() > ORIENTATION_TOL]
    if odd:
        raise StudyError(
            folder,
            "slices of one series have different orientations",
            [Problem(str(s.path), "ImageOrientationPatient differs from the series") for s in odd],
        )
    shapes = defaultdict(list)
    for s in series:
        shapes[(int(s.ds.Rows), int(s.ds.Columns))].append(s)
    if len(shapes) > 1:
        main = max(shapes, key=lambda k: len(shapes[k]))
        raise StudyError(
            folder,
            f"mixed Rows/Columns in one series (most are {main[0]}x{main[1]})",
            [
                Problem(str(s.path), f"Rows/Columns {k[0]}x{k[1]} differ from the series' {main[0]}x{main[1]}")
                for k, group in shapes.items()
                if k != main
                for s in group
            ],
        )
    normal = np.cross(ref[:3], ref[3:])
    order = sorted(series, key=lambda s: float(s.position @ normal))
    along = np.array([float(s.position @ normal) for s in order])
    if len(order) < 2:
        # One slice has no neighbour to measure from: fall back on the header's thickness.
        ds = order[0].ds
        thickness = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
        return order, normal * thickness
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps < DUPLICATE_TOL_MM)
    if dup.size:
        i = int(dup[0])
        raise StudyError(
            folder,
            "duplicate slice positions",
            [
                Problem(str(order[j].path), f"same position ({along[i]:.3f} mm along the normal) as another slice")
                for j in (i, i + 1)
            ],
        )
    median = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - median) > UNEVEN_TOL * median)
    if bad.size:
        i = int(bad[0])
        raise StudyError(
            folder,
            f"uneven slice spacing (missing or extra slice?): median {median:.3f} mm",
            [
                Problem(
                    str(order[i + 1].path),
                    f"gap of {gaps[i]:.3f} mm from {order[i].path.name} where the series has {median:.3f} mm",
                )
            ],
        )
    step = (order[-1].position - order[0].position) / (len(order) - 1)
    return order, step


@_quiet_nonconforming_uids()
def read_study(folder: Path | str) -> StudyVolume:
    """Read the one axial CT series of a study folder.

    Files that are not DICOM, not CT, without pixel data, or localizers are reported (in ``problems``)
    and skipped. Raises :class:`StudyError` when no consistent series remains, or when the folder
    holds more than one axial CT series (naming them).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StudyError(folder, "study folder does not exist")
    problems: list[Problem] = []
    slices: list[_Slice] = []
    localizers = 0
    for path in list_files(folder):
        ds, problem = _read_header(path)
        if problem is None:
            problem = _localizer_problem(path, ds)
            if problem is not None:
                localizers += 1
            else:
                problem = _check_ct_slice(path, ds)
        if problem is not None:
            problems.append(problem)
            continue
        try:
            position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
            orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
            if position.shape != (3,) or orientation.shape != (6,):
                raise ValueError("wrong number of values")
        except (TypeError, ValueError) as exc:
            problems.append(Problem(str(path), f"malformed ImagePositionPatient/ImageOrientationPatient ({exc})"))
            continue
        slices.append(_Slice(path, ds, position, orientation))
    if not slices:
        raise StudyError(folder, "no usable axial CT image in the folder", problems)

    groups = _group_series(slices)
    if len(groups) > 1:
        names = ", ".join(f"{uid} ({len(g)} files, e.g. {g[0].path.name})" for uid, g in sorted(groups.items()))
        raise StudyError(folder, f"more than one axial CT series in the study folder: {names}", problems)
    ordered, step = _sort_and_check(folder, next(iter(groups.values())))

    planes = []
    decode_problems = []
    for s in ordered:
        hu, problem = _decode(s.path, s.ds)
        if problem is not None:
            decode_problems.append(problem)
        planes.append(hu)
    if decode_problems:
        # A slice that cannot be decoded leaves a hole: the volume would be silently wrong.
        raise StudyError(folder, f"{len(decode_problems)} slice(s) could not be decoded", problems + decode_problems)

    first = ordered[0].ds
    spacing = tuple(float(v) for v in first.PixelSpacing)
    geometry = Geometry(
        origin=tuple(float(v) for v in ordered[0].position),
        row_dir=tuple(float(v) for v in ordered[0].orientation[:3]),
        col_dir=tuple(float(v) for v in ordered[0].orientation[3:]),
        slice_step=tuple(float(v) for v in step),
        pixel_spacing=(spacing[0], spacing[1]),
        shape=(len(planes), int(first.Rows), int(first.Columns)),
    )
    return StudyVolume(
        np.stack(planes).astype(np.float32, copy=False),
        geometry,
        tuple(problems),
        localizers,
        tuple(s.path for s in ordered),
    )
