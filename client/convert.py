"""``convert STUDY_DIR OUT.nii.gz``: the HU volume the pipeline reads, as a NIfTI file.

Like dcm2niix, the array is stored as ``[column, row, slice]`` and the affine maps those voxel
indices to RAS+ millimetres, so any NIfTI viewer shows the study where the scanner put it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from client.dicom import Geometry, read_study

#: (c, r, k) -> (k, r, c): the index permutation between the NIfTI array and ours.
_CRK_TO_KRC = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def nifti_affine(geometry: Geometry) -> np.ndarray:
    """RAS+ affine for an array stored as ``[c, r, k]``."""
    return geometry.affine_ras() @ _CRK_TO_KRC


def to_nifti_array(volume: np.ndarray) -> np.ndarray:
    """``[k, r, c]`` -> ``[c, r, k]``; int16 when every value is a whole number in range."""
    data = np.transpose(volume, (2, 1, 0))
    if np.all(np.mod(data, 1) == 0) and data.min() >= -32768 and data.max() <= 32767:
        return data.astype(np.int16)
    return data.astype(np.float32)


def convert_study(study_dir: Path | str, out_path: Path | str) -> Path:
    """Write a study's HU volume as NIfTI (qform and sform both 'scanner'). Returns the path."""
    import nibabel as nib

    study = read_study(study_dir)
    affine = nifti_affine(study.geometry)
    img = nib.Nifti1Image(to_nifti_array(study.volume), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(out_path))
    return out_path
