"""The PhysioNet CT-ICH release read as a site folder: the same :class:`StudyRecord` as the DICOM walk.

"Computed Tomography Images for Intracranial Hemorrhage Detection and Segmentation" (Hssayeni et
al., PhysioNet ct-ich v1.3.1) ships NIfTI volumes instead of DICOM::

    SITE_DIR/
      ct_scans/NNN.nii                  HU volume of patient NNN (049-058, 066-130)
      masks/NNN.nii                     hemorrhage mask (0/1) on the same grid
      hemorrhage_diagnosis_raw_ct.csv   one row per slice: PatientNumber, SliceNumber (1-based, along
                                        the file's third axis), Intraventricular, Intraparenchymal,
                                        Subarachnoid, Epidural, Subdural, No_Hemorrhage, Fracture_Yes_No
      Patient_demographics.csv          not read
      site.toml, labels.csv             optional, as in a DICOM site (docs/design.md §4)

One study per patient; its patient and study id are both the file's number (``049``). Each volume
is reoriented without resampling to the axes of a standard axial DICOM series (columns towards the
patient's left, rows towards posterior, slices from feet to head), so the arrays look like the
DICOM sites' and the geometry stays exact. CT-ICH annotates no expansion marker: every label is
NaN (not annotated) unless the site adds a ``labels.csv``, so the site trains the U-Net (stage 1).
The slice flags of the CSV go into ``StudyRecord.extras`` (:data:`EXTRAS`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.ingest.convert import geometry_from_nifti
from client.ingest.dicom import Geometry, Problem, StudyError
from client.ingest.labels import LabelTable, missing_columns, parse_label_value, read_labels
from client.ingest.masks import MaskError, check_binary, grid_mapping, to_series_grid
from client.ingest.study import MASK_SUFFIXES, StudyRecord, StudyRef
from common.config import AIR_HU, LABELS

SCANS_DIR = "ct_scans"
MASKS_DIR = "masks"
DIAGNOSIS_CSV = "hemorrhage_diagnosis_raw_ct.csv"
SUBTYPES: tuple[str, ...] = ("Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural", "Subdural")
FLAG_COLUMNS: tuple[str, ...] = SUBTYPES + ("No_Hemorrhage", "Fracture_Yes_No")
CSV_ID_COLUMNS: tuple[str, str] = ("PatientNumber", "SliceNumber")
#: Where the stored NIfTI axes ``[c, r, k]`` point after reorientation (nibabel axis codes):
#: patient Left, Posterior, Superior, as ImageOrientationPatient (1,0,0,0,1,0) with rising slices.
STORED_AXES: tuple[str, str, str] = ("L", "P", "S")
#: ``StudyRecord.extras`` a CT-ICH study carries (strings, like labels.csv's extra columns).
EXTRAS: dict[str, str] = {
    "ich_slices": "one character per slice in volume order k: 1 hemorrhage, 0 none (No_Hemorrhage), - no CSV row",
    "ich_subtypes": "subtypes flagged on any slice, lower case, ';'-separated ('' for none)",
    "fracture": "1 if any slice has Fracture_Yes_No = 1, else 0",
}


@dataclass(frozen=True)
class NiftiVolume:
    """A readable CT-ICH scan: HU volume ``[k, r, c]`` (float32), its geometry, and how it was stored.

    ``slice_index[k]`` is the file's slice (third-axis) index of volume slice ``k``, None when the
    file's third axis is not the slice axis.
    """

    volume: np.ndarray
    geometry: Geometry
    file_affine: np.ndarray
    file_shape: tuple[int, int, int]
    slice_index: np.ndarray | None
    problems: tuple[Problem, ...] = ()


def _has_orientation(img) -> bool:
    """Whether the header says where the voxels are (a non-zero qform or sform code)."""
    header = img.header
    if not hasattr(header, "get_qform"):
        return True  # not NIfTI: nibabel's affine is all there is
    return bool(header.get_qform(coded=True)[1] or header.get_sform(coded=True)[1])


def _load(path: Path, what: str, error: type[Exception]):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = img.get_fdata(dtype=np.float32) if what == "volume" else np.asanyarray(img.dataobj)
    except Exception as exc:  # not NIfTI, truncated, gzip errors, ...
        raise error(path, f"unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise error(path, f"{what} must be a 3-D volume, got shape {data.shape}")
    return img, data


def read_nifti_volume(path: Path | str) -> NiftiVolume:
    """Read a CT-ICH scan into HU ``[k, r, c]`` with its :class:`Geometry`; StudyError if unusable.

    The NIfTI scaling (scl_slope, scl_inter) gives HU; as for DICOM (``client.ingest.dicom.to_hounsfield``)
    everything below air becomes air. The array is flipped and permuted, never resampled, onto
    :data:`STORED_AXES`; the affine follows, so the geometry stays exact (also for a tilted stack).
    """
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        inv_ornt_aff,
        io_orientation,
        ornt_transform,
    )

    path = Path(path)
    img, data = _load(path, "volume", StudyError)
    if not np.isfinite(data).all():
        raise StudyError(path, "volume holds NaN or infinite values")
    affine = np.asarray(img.affine, dtype=np.float64)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise StudyError(path, "singular affine: the voxel grid has no extent along an axis")
    problems = []
    if not _has_orientation(img):
        problems.append(
            Problem(
                str(path), "no orientation in the header (qform and sform codes 0): nibabel's default axes are assumed"
            )
        )
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(STORED_AXES))
    stored = apply_orientation(data, transform)
    volume = np.ascontiguousarray(np.transpose(stored, (2, 1, 0)), dtype=np.float32)
    np.maximum(volume, AIR_HU, out=volume)
    geometry = geometry_from_nifti(affine @ inv_ornt_aff(transform, data.shape), volume.shape)
    slice_axis, slice_flip = int(transform[2][0]), transform[2][1] < 0
    slice_index = None
    if slice_axis == 2:
        slice_index = np.arange(data.shape[2])[::-1] if slice_flip else np.arange(data.shape[2])
    return NiftiVolume(volume, geometry, affine, tuple(int(n) for n in data.shape), slice_index, tuple(problems))


def binary_mask(data: np.ndarray) -> np.ndarray:
    """uint8 0/1 from a mask stored 0/1 or 0/255 (both in use for CT-ICH masks); ValueError otherwise."""
    values = np.unique(data)
    if values.size and np.isin(values, (0, 255)).all() and values.max() == 255:
        return (data == 255).astype(np.uint8)
    return check_binary(data)


def read_ctich_mask(path: Path | str, scan: NiftiVolume) -> tuple[np.ndarray, Problem | None]:
    """A CT-ICH mask on the scan's ``[k, r, c]`` grid, and a note when the grid had to be assumed.

    The mask's affine maps it onto the scan, as for any mask (docs/design.md §4). A mask whose header
    has no orientation at all is taken voxel for voxel on the scan's file grid, as the release
    states, if its shape is the scan's (reported). Raises :class:`MaskError` with the reason.
    """
    path = Path(path)
    img, data = _load(path, "mask", MaskError)
    affine, note = img.affine, None
    if not _has_orientation(img):
        if tuple(data.shape) != scan.file_shape:
            raise MaskError(path, f"mask shape {tuple(data.shape)} differs from the scan's {scan.file_shape}")
        affine = scan.file_affine
        note = Problem(
            str(path),
            "mask header has no orientation (qform and sform codes 0): "
            "taken voxel for voxel on the scan's grid, as the CT-ICH release states",
        )
    try:
        perm, flip = grid_mapping(scan.geometry, affine, data.shape)
        return binary_mask(to_series_grid(data, perm, flip)), note
    except ValueError as exc:
        raise MaskError(
            path, f"mask of shape {tuple(data.shape)} does not fit the scan (shape {scan.file_shape}): {exc}"
        ) from exc


@dataclass(frozen=True)
class SliceRow:
    line: int
    flags: dict[str, float]  # FLAG_COLUMNS -> 0.0 / 1.0, NaN where the column is missing or empty


@dataclass(frozen=True)
class Diagnosis:
    """``hemorrhage_diagnosis_raw_ct.csv``: rows per patient id and 1-based slice number."""

    path: Path
    rows: dict[str, dict[int, SliceRow]]
    problems: tuple[Problem, ...] = ()
    found: bool = True


def read_diagnosis(path: Path | str, patients: dict[int, str]) -> Diagnosis:
    """Validate the slice-level CSV; bad rows are reported with their line and left out.

    ``patients``: PatientNumber -> patient id of the scans in ``ct_scans/``; a row of another
    patient is reported. A slice named on two rows is reported on both and gets no flags.
    """
    path = Path(path)
    if not path.is_file():
        return Diagnosis(
            path,
            {},
            (Problem(str(path), "not found: slice-level hemorrhage flags unknown (not needed for training)"),),
            found=False,
        )
    problems: list[Problem] = []
    found: dict[tuple[str, int], list[SliceRow]] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fatal = missing_columns(path, reader, CSV_ID_COLUMNS, "no row can be read")
        if fatal:
            return Diagnosis(path, {}, (fatal,))
        lacking = missing_columns(path, reader, FLAG_COLUMNS, "read as unknown on every slice")
        if lacking:
            problems.append(lacking)
        for line, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            where = f"{path}:{line}"
            if not any(row.values()):
                continue
            if None in raw:
                problems.append(Problem(where, "more values than columns"))
                continue
            try:
                number, slice_number = int(row["PatientNumber"]), int(row["SliceNumber"])
            except ValueError:
                problems.append(
                    Problem(
                        where,
                        f"PatientNumber {row['PatientNumber']!r} / SliceNumber "
                        f"{row['SliceNumber']!r} are not whole numbers",
                    )
                )
                continue
            if number not in patients:
                problems.append(Problem(where, f"patient {number} has no scan in {SCANS_DIR}/"))
                continue
            if slice_number < 1:
                problems.append(Problem(where, f"SliceNumber {slice_number} is not 1-based"))
                continue
            flags, bad = {}, None
            for c in FLAG_COLUMNS:
                try:
                    flags[c] = parse_label_value(row.get(c, ""))
                except ValueError as exc:
                    bad = f"column {c}: {exc}"
                    break
            if bad is not None:
                problems.append(Problem(where, bad))
                continue
            found.setdefault((patients[number], slice_number), []).append(SliceRow(line, flags))
    rows: dict[str, dict[int, SliceRow]] = {}
    for (patient_id, slice_number), same in found.items():
        if len(same) > 1:
            lines = ", ".join(str(r.line) for r in same)
            problems.extend(
                Problem(
                    f"{path}:{r.line}",
                    f"duplicate row for slice {slice_number} of patient "
                    f"{patient_id} (lines {lines}): none of them is used",
                )
                for r in same
            )
            continue
        rows.setdefault(patient_id, {})[slice_number] = same[0]
    return Diagnosis(path, rows, tuple(problems))


def slice_extras(ref: StudyRef, scan: NiftiVolume, diagnosis: Diagnosis) -> tuple[dict[str, str], list[Problem]]:
    """The study's :data:`EXTRAS` from its CSV rows (mapped onto volume order), and row problems."""
    rows = diagnosis.rows.get(ref.patient_id, {})
    if not diagnosis.found:
        return {}, []
    if not rows:
        return {}, [Problem(str(ref.dicom_dir), f"no row in {DIAGNOSIS_CSV}: slice flags unknown")]
    if scan.slice_index is None:
        return {}, [Problem(str(ref.dicom_dir), "the file's third axis is not its slice axis: slice flags not mapped")]
    n_file = scan.file_shape[2]
    problems = [
        Problem(f"{diagnosis.path}:{r.line}", f"slice {s} is beyond the {n_file} slices of {ref.dicom_dir.name}")
        for s, r in sorted(rows.items())
        if s > n_file
    ]
    absent = n_file - sum(1 for s in rows if s <= n_file)
    if absent:
        problems.append(
            Problem(str(diagnosis.path), f"{absent} of the {n_file} slices of {ref.dicom_dir.name} have no row")
        )
    marks = []
    for file_slice in scan.slice_index:
        row = rows.get(int(file_slice) + 1)
        none = np.nan if row is None else row.flags["No_Hemorrhage"]
        marks.append("-" if np.isnan(none) else ("0" if none == 1 else "1"))
    used = [r for s, r in rows.items() if s <= n_file]
    subtypes = [c.lower() for c in SUBTYPES if any(r.flags[c] == 1 for r in used)]
    fracture = "1" if any(r.flags["Fracture_Yes_No"] == 1 for r in used) else "0"
    return {"ich_slices": "".join(marks), "ich_subtypes": ";".join(subtypes), "fracture": fracture}, problems


def _nifti_stem(name: str) -> str | None:
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _list_nifti(folder: Path, what: str) -> tuple[dict[str, Path], list[Problem]]:
    files: dict[str, Path] = {}
    problems: list[Problem] = []
    if not folder.is_dir():
        return files, problems
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        stem = _nifti_stem(path.name)
        if stem is None or not path.is_file():
            problems.append(Problem(str(path), f"not a NIfTI {what} (.nii or .nii.gz): ignored"))
        elif stem in files:
            problems.append(
                Problem(str(path), f"a second {what} for patient {stem} (also {files[stem].name}): ignored")
            )
        else:
            files[stem] = path
    return files, problems


def discover_ctich_studies(site_dir: Path) -> tuple[list[StudyRef], list[Problem]]:
    """One study per ``ct_scans/NNN.nii``; its mask is ``masks/NNN.nii``; masks without a scan are reported."""
    scans, problems = _list_nifti(site_dir / SCANS_DIR, "scan")
    masks, mask_problems = _list_nifti(site_dir / MASKS_DIR, "mask")
    problems += mask_problems
    problems += [
        Problem(str(p), f"mask without a scan in {SCANS_DIR}/") for stem, p in masks.items() if stem not in scans
    ]
    if not scans:
        problems.append(Problem(str(site_dir / SCANS_DIR), "no NIfTI scan in the folder"))
    return [StudyRef(stem, stem, path, masks.get(stem)) for stem, path in scans.items()], problems


def load_ctich_study(ref: StudyRef, table: LabelTable | None, diagnosis: Diagnosis) -> StudyRecord:
    """Read one CT-ICH study; a bad mask keeps the study (without mask), as for DICOM sites."""
    record = StudyRecord(ref)
    try:
        scan = read_nifti_volume(ref.dicom_dir)
    except StudyError as exc:
        record.problems.append(Problem(exc.path, exc.reason))
        return record
    record.volume, record.geometry = scan.volume, scan.geometry
    record.problems.extend(scan.problems)
    if ref.mask_path is not None:
        try:
            record.mask, note = read_ctich_mask(ref.mask_path, scan)
            if note is not None:
                record.problems.append(note)
        except MaskError as exc:
            record.problems.append(Problem(exc.path, f"{exc.reason}; the study is used without its mask"))
    extras, problems = slice_extras(ref, scan, diagnosis)
    record.problems.extend(problems)
    if table is None:  # the release annotates no marker: not annotated, never 0
        record.labels = np.full(len(LABELS), np.nan, dtype=np.float32)
    else:
        record.labels = table.labels.get(ref.key)
        extras.update(table.extras.get(ref.key, {}))
    record.extras = extras
    return record


def iter_ctich_studies(site_dir: Path | str) -> Iterator[StudyRecord | list[Problem]]:
    """The CT-ICH walk of ``client.ingest.layouts.iter_studies``: site-level problems first, then each study."""
    site_dir = Path(site_dir)
    refs, problems = discover_ctich_studies(site_dir)
    table = None
    if (site_dir / "labels.csv").is_file():  # optional here: a site may annotate markers itself
        table = read_labels(site_dir / "labels.csv", {r.key for r in refs})
        problems.extend(table.problems)
    numbers = {int(r.patient_id): r.patient_id for r in refs if r.patient_id.isdigit()}
    diagnosis = read_diagnosis(site_dir / DIAGNOSIS_CSV, numbers)
    yield problems + list(diagnosis.problems)
    for ref in refs:
        yield load_ctich_study(ref, table, diagnosis)
