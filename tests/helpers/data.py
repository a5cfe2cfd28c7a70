"""Test data written to tmp_path: DICOM series with fake PHI, phantom heads, site folders."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

PHI = {
    "PatientName": "TESTPERSON^ALICE^Q",
    "PatientID": "PID-77441",
    "PatientBirthDate": "19530412",
    "AccessionNumber": "ACC99182736",
    "InstitutionName": "Saint Example General Hospital",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "StudyDate": "20240117",
    "StudyTime": "031522",
}


def write_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing=(5.0, 0.8, 0.8),
    origin=(-100.0, -120.0, 30.0),
    row_dir=(1.0, 0.0, 0.0),
    col_dir=(0.0, 1.0, 0.0),
    signed: bool = True,
    slope: float = 1.0,
    intercept: float = -1024.0,
    padding: int | None = None,
    padding_mask: np.ndarray | None = None,
    reverse: bool = False,
    shuffle_names: bool = True,
    series_uid: str | None = None,
    modality: str = "CT",
    phi: dict | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write ``hu`` ([k, r, c], HU) as one CT slice per file with the given geometry.

    Stored values are ``(hu - intercept) / slope``; slices are written in reverse position order
    when ``reverse``, with random file names and scrambled InstanceNumbers when ``shuffle_names``.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    k_count = hu.shape[0]
    normal = np.cross(row_dir, col_dir)
    study_uid, series_uid = generate_uid(), series_uid or generate_uid()
    frame_uid = generate_uid()
    order = list(range(k_count))[::-1] if reverse else list(range(k_count))
    instance_numbers = rng.sample(range(1, 10 * k_count), k_count) if shuffle_names else list(range(1, k_count + 1))
    paths = []
    for n, k in enumerate(order):
        stored = np.round((hu[k] - intercept) / slope)
        if padding is not None and padding_mask is not None:
            stored = np.where(padding_mask[k], padding, stored)
        dtype = np.int16 if signed else np.uint16
        info = np.iinfo(dtype)
        assert stored.min() >= info.min and stored.max() <= info.max, "test volume out of range for dtype"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = f"{rng.getrandbits(40):010x}.dcm" if shuffle_names else f"slice{n:03d}.dcm"
        ds = FileDataset(str(folder / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = modality
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        for tag, value in (phi or PHI).items():
            setattr(ds, tag, value)
        pos = np.asarray(origin) + k * spacing[0] * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0] * 1.5  # deliberately wrong: the reader must use positions
        ds.InstanceNumber = instance_numbers[n]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        if padding is not None:
            ds.PixelPaddingValue = padding
        ds.PixelData = stored.astype(dtype).tobytes()
        ds.save_as(folder / name, enforce_file_format=True)
        paths.append(folder / name)
    return paths


def head_phantom(shape=(6, 48, 48), seed: int = 0) -> np.ndarray:
    """A small head in HU: air, skull ring, brain, a 70 HU blob; integer-valued."""
    k, r, c = shape
    rr, cc = np.mgrid[0:r, 0:c]
    d = np.hypot((rr - r / 2) / (r * 0.42), (cc - c / 2) / (c * 0.36))
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000.0)
    for z in range(k):
        sl = vol[z]
        sl[d < 1.0] = 1000.0
        sl[d < 0.85] = 35.0
        sl[(np.hypot(rr - r * 0.45, cc - c * 0.55) < 4 + z % 2)] = 70.0
        sl += np.where(d < 0.85, rng.integers(-3, 4, size=(r, c)), 0)
    return vol.astype(np.float32)


def write_site(
    root: Path,
    n_studies: int = 4,
    shape=(6, 48, 48),
    labels: list[list[str]] | None = None,
    window: tuple[float, float] | None = None,
    seed: int = 0,
) -> Path:
    """A site folder in the data contract: studies P00i/S00i with phantom heads, masks, labels.csv."""
    import nibabel as nib

    from client.ingest.dicom import read_study

    root.mkdir(parents=True, exist_ok=True)
    if window is not None:
        root.joinpath("site.toml").write_text(
            f'site_id = "{root.name}"\nname = "Test site"\nwindow = [{window[0]}, {window[1]}]\n'
        )
    rows = ["patient_id,study_id,hypodensity,irregular_margin,blend_sign,fluid_level,expansion,location"]
    for i in range(n_studies):
        pid, sid = f"P{i:03d}", f"S{i:03d}"
        hu = head_phantom(shape, seed=seed + i)
        study_dir = root / "dicom" / pid / sid
        write_series(study_dir, hu, seed=seed + i, phi={**PHI, "PatientID": pid, "PatientName": f"DOE^PATIENT{i}"})
        geometry = read_study(study_dir).geometry
        mask = ((hu > 60) & (hu < 80)).astype(np.uint8)
        (root / "masks" / pid).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(mask, geometry.affine_ras()), str(root / "masks" / pid / f"{sid}.nii.gz"))
        values = labels[i] if labels else [str(i % 2), "0", "", "1" if i == 0 else "0", ""]
        rows.append(",".join([pid, sid, *values, "putamen"]))
    root.joinpath("labels.csv").write_text("\n".join(rows) + "\n")
    return root
