"""``convert STUDY_DIR OUT.nii.gz``: the HU volume the pipeline reads, as a NIfTI file.

Like dcm2niix, the array is stored as ``[column, row, slice]`` and the affine maps those voxel
indices to RAS+ millimetres, so any NIfTI viewer shows the study where the scanner put it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.ingest.dicom import Geometry, read_study

#: (c, r, k) -> (k, r, c): the index permutation between the NIfTI array and ours.
_CRK_TO_KRC = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def nifti_affine(geometry: Geometry) -> np.ndarray:
    """RAS+ affine for an array stored as ``[c, r, k]``."""
    return geometry.affine_ras() @ _CRK_TO_KRC


def geometry_from_nifti(affine: np.ndarray, shape_krc: tuple[int, int, int]) -> Geometry:
    """The inverse of :func:`nifti_affine`: the :class:`Geometry` of a NIfTI array stored ``[c, r, k]``.

    ``affine`` maps the stored ``(c, r, k)`` indices to RAS+ mm; ``shape_krc`` is the shape after
    transposing to ``[k, r, c]``. ``Geometry.affine_ras()`` of the result equals ``affine @ _CRK_TO_KRC``.
    """
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64) @ _CRK_TO_KRC
    row_step, col_step = lps[:3, 1], lps[:3, 2]  # moving one row (along col_dir), one column (along row_dir)
    row_mm, col_mm = float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))
    return Geometry(
        origin=tuple(float(v) for v in lps[:3, 3]),
        row_dir=tuple(float(v) for v in col_step / col_mm),
        col_dir=tuple(float(v) for v in row_step / row_mm),
        slice_step=tuple(float(v) for v in lps[:3, 0]),
        pixel_spacing=(row_mm, col_mm),
        shape=tuple(int(n) for n in shape_krc),
    )


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
