"""Writing a site folder in the data contract (docs/design.md §4): DICOM, masks, labels, site.toml.

The only module of the generator that touches pydicom, nibabel or the file system layout.
Everything written is a pure function of the rendered study, so the same seed gives the same
bytes (gzip headers carry no timestamp; UIDs are hashes of the seed and the study).
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from common.config import AIR_HU, LABELS
from simulations.synthetic.profiles import SiteProfile, parse_mask_layout
from simulations.synthetic.study import RenderedStudy

#: labels.csv columns: the contract's, then the extras this generator knows.
LABEL_COLUMNS: tuple[str, ...] = ("patient_id", "study_id") + LABELS + ("location", "followup_study_id")
#: Tags that change from one slice of a series to the next (everything else is encoded once).
_PER_SLICE_TAGS: tuple[int, ...] = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)
#: RAS = diag(-1, -1, 1) @ LPS (docs/design.md §8).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ds(v: float) -> str:
    """A decimal string (DS) of at most 16 characters that round-trips the value we used."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


def study_uid(plan, *parts: object) -> UID:
    """Deterministic UID from the seed, the site, the study and the item's role.

    ``generate_uid(prefix=None, ...)`` ignores its entropy and returns a random UUID, so the
    pydicom root with hashed entropy is used instead.
    """
    key = "|".join(str(p) for p in ("hemexp", plan.seed, plan.site_number, plan.study_id, *parts))
    return generate_uid(entropy_srcs=[key])


def hu_to_stored(hu: np.ndarray, profile: SiteProfile, outside: np.ndarray | None = None) -> np.ndarray:
    """Stored values: round((HU - RescaleIntercept) / RescaleSlope), padding outside the FOV."""
    lo, hi = profile.stored_range
    v = np.rint((hu - profile.rescale_intercept) / profile.rescale_slope)
    v = np.clip(v, lo, hi)
    if outside is not None:
        fill = profile.pixel_padding_value
        if fill is None:
            fill = np.rint((AIR_HU - profile.rescale_intercept) / profile.rescale_slope)
        v[..., outside] = fill
    return v.astype("<i2" if profile.pixel_representation else "<u2")


def _base_dataset(
    profile: SiteProfile,
    r: RenderedStudy,
    series_uid: UID,
    series_number: int,
    image_type: list[str],
    description: str,
    when_offset_s: int,
) -> Dataset:
    plan = r.plan
    when = plan.acquired
    da, tm = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ser_tm = (when + timedelta(seconds=when_offset_s)).strftime("%H%M%S")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "HEMEXP_SYNTH_1"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = image_type
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = da
    ds.StudyTime = tm
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ser_tm
    ds.AccessionNumber = plan.accession
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = profile.name
    ds.InstitutionAddress = f"{10 + plan.site_number * 7} Hospital Road, Springfield"
    ds.ReferringPhysicianName = plan.referring_physician
    ds.StationName = profile.station_name
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = description
    ds.ManufacturerModelName = profile.model_name
    ds.PatientName = plan.patient.name
    ds.PatientID = plan.patient.patient_id
    ds.PatientBirthDate = plan.patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = plan.patient.sex
    ds.OtherPatientIDs = plan.patient.other_id
    ds.PatientAge = plan.patient.age_at(when)
    ds.BodyPartExamined = "HEAD"
    ds.KVP = _ds(profile.kvp)
    ds.ReconstructionDiameter = _ds(profile.fov_mm)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = _ds(-plan.table_offset[1])
    ds.XRayTubeCurrent = 250 if profile.kvp >= 120 else 320
    ds.ConvolutionKernel = profile.kernel_name
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid(plan, "study")
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = plan.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study_uid(plan, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = profile.pixel_representation
    if profile.pixel_padding_value is not None:
        ds.add_new(0x00280120, "SS" if profile.pixel_representation else "US", int(profile.pixel_padding_value))
    a, b = profile.window
    ds.WindowCenter = _ds((a + b) / 2.0)
    ds.WindowWidth = _ds(b - a)
    ds.RescaleIntercept = _ds(profile.rescale_intercept)
    ds.RescaleSlope = _ds(profile.rescale_slope)
    ds.RescaleType = "HU"
    return ds


def _file_names(rng: np.random.Generator, n: int, extension: str) -> list[str]:
    """Random, unique names, so that name order says nothing about slice order."""
    names: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        name = f"IM{int(rng.integers(0, 16**8)):08X}{extension}"
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def _element_bytes(ds: Dataset, tag: int, encoding: str | None) -> bytes:
    elem = correct_ambiguous_vr_element(ds[tag], ds, True)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encoding)
    return fp.getvalue()


class _SeriesEncoder:
    """Part 10 bytes of a series' slices, the same bytes ``save_as(enforce_file_format=True)``
    writes: the elements shared by every slice are encoded once (pydicom spends most of a
    generation run re-encoding ~70 identical elements per file), the per-slice ones each time."""

    def __init__(self, ds: Dataset) -> None:
        self.encoding = ds.get("SpecificCharacterSet")
        self.shared = {
            int(e.tag): _element_bytes(ds, int(e.tag), self.encoding) for e in ds if int(e.tag) not in _PER_SLICE_TAGS
        }

    def encode(self, ds: Dataset) -> bytes:
        own = {t: _element_bytes(ds, t, self.encoding) for t in _PER_SLICE_TAGS if t in ds}
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        merged = {**self.shared, **own}
        return fp.getvalue() + b"".join(merged[t] for t in sorted(merged))


def write_dicom_study(study_dir: Path, profile: SiteProfile, r: RenderedStudy) -> int:
    """Write the axial series (and a localizer when planned) into ``study_dir``; return #files."""
    study_dir.mkdir(parents=True, exist_ok=True)
    plan, grid = r.plan, r.grid
    k_n, rows, cols = grid.shape
    rng = plan.rng(31 if not plan.is_followup else 32)
    names = _file_names(rng, k_n + 1, profile.file_extension)
    stored = hu_to_stored(r.hu, profile, r.outside_fov if profile.fov_circle else None)
    series_uid = study_uid(plan, "series", 2)
    ds = _base_dataset(
        profile,
        r,
        series_uid,
        2,
        ["ORIGINAL", "PRIMARY", "AXIAL"],
        f"HEAD {profile.slice_thickness_mm:g}mm {profile.kernel_name}",
        30,
    )
    ds.SliceThickness = _ds(profile.slice_thickness_mm)
    ds.SpacingBetweenSlices = _ds(grid.slice_spacing)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [_ds(grid.pixel_spacing), _ds(grid.pixel_spacing)]
    if profile.instance_order == "ascending":
        numbers = np.arange(1, k_n + 1)
    elif profile.instance_order == "descending":
        numbers = np.arange(k_n, 0, -1)
    else:
        numbers = rng.permutation(k_n) + 1
    zs = grid.zs()
    encoder = _SeriesEncoder(ds)
    for k in range(k_n):
        sop = study_uid(plan, "sop", 2, k)
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = int(numbers[k])
        ds.ImagePositionPatient = [_ds(grid.origin[0]), _ds(grid.origin[1]), _ds(zs[k])]
        ds.SliceLocation = _ds(zs[k])
        ds.PixelData = stored[k].tobytes()
        (study_dir / names[k]).write_bytes(encoder.encode(ds))
    n_files = k_n
    if plan.has_scout:
        _write_scout(study_dir / names[k_n], profile, r)
        n_files += 1
    return n_files


def _write_scout(path: Path, profile: SiteProfile, r: RenderedStudy) -> None:
    """A lateral localizer: a projection through the head, sagittal orientation, own series."""
    grid, plan = r.grid, r.plan
    k_n, rows, cols = grid.shape
    mu = np.clip((r.hu + 1000.0) / 1000.0, 0.0, None)  # attenuation relative to water
    path_mm = mu.sum(axis=2) * grid.pixel_spacing  # (K, R): z by y
    n_rows = max(16, int(round((k_n - 1) * grid.slice_spacing / grid.pixel_spacing)) + 1)
    img = ndimage.zoom(path_mm, (n_rows / k_n, 1.0), order=1)[::-1]  # row 0 = most superior
    img = -1000.0 + img * 8.0
    stored = hu_to_stored(img, profile)
    z_top = grid.zs()[-1]
    dz_row = (k_n - 1) * grid.slice_spacing / max(n_rows - 1, 1)
    ds = _base_dataset(
        profile, r, study_uid(plan, "series", 1), 1, ["ORIGINAL", "PRIMARY", "LOCALIZER"], "TOPOGRAM LAT", 0
    )
    sop = study_uid(plan, "sop", 1, 0)
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.InstanceNumber = 1
    ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    ds.ImagePositionPatient = [_ds(grid.centre_xy[0]), _ds(grid.origin[1]), _ds(z_top)]
    ds.Rows, ds.Columns = int(img.shape[0]), int(img.shape[1])
    ds.PixelSpacing = [_ds(round(dz_row, 6)), _ds(grid.pixel_spacing)]
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def mask_affine(grid, layout: str) -> tuple[tuple[int, ...], tuple[bool, ...], np.ndarray]:
    """Stored axis order, flips, and the RAS affine of a mask stored in ``layout``."""
    axes, flips = parse_mask_layout(layout)
    m = grid.index_to_lps()
    a = np.eye(4)
    a[:3, 3] = m[:3, 3]
    for j, (ax, fl) in enumerate(zip(axes, flips)):
        col = m[:3, ax]
        if fl:
            a[:3, 3] += col * (grid.shape[ax] - 1)
            col = -col
        a[:3, j] = col
    return axes, flips, LPS_TO_RAS @ a


def write_mask(path: Path, mask: np.ndarray, grid, layout: str) -> None:
    """NIfTI-1 mask (uint8 0/1) in the site's axis order, with the RAS affine that undoes it."""
    axes, flips, affine = mask_affine(grid, layout)
    arr = np.transpose(mask.astype(np.uint8), axes)
    for j, fl in enumerate(flips):
        if fl:
            arr = np.flip(arr, axis=j)
    img = nib.Nifti1Image(np.ascontiguousarray(arr), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def write_labels(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """labels.csv: one row per study, 1 / 0 / empty (not annotated)."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(LABEL_COLUMNS), lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({c: ("" if row.get(c) is None else row[c]) for c in LABEL_COLUMNS})


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def write_site_toml(path: Path, profile: SiteProfile) -> None:
    a, b = profile.window
    path.write_text(
        f"site_id = {_toml_str(profile.site_id)}\nname = {_toml_str(profile.name)}\nwindow = [{a:g}, {b:g}]\n"
    )
