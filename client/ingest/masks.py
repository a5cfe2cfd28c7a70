"""Map a NIfTI hematoma mask onto the voxel grid of its DICOM series.

A mask's affine, not its axis order, says which voxel is which (docs/design.md §4): masks written by
dcm2niix, ITK-SNAP or 3D Slicer store the same grid with permuted or flipped axes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.ingest.dicom import Geometry

#: Tolerance (in voxels) for the two grids to be "the same grid".
GRID_TOL = 0.05


class MaskError(Exception):
    """A mask file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def grid_mapping(
    geometry: Geometry, nifti_affine: np.ndarray, nifti_shape: tuple[int, ...]
) -> tuple[list[int], list[bool]]:
    """How the NIfTI array's axes map onto ``[k, r, c]``.

    Returns ``(perm, flip)`` such that ``np.transpose(data, perm)`` then flipping the axes where
    ``flip`` is true gives the array on the DICOM grid. Raises ValueError when the grids differ.
    """
    t = np.linalg.inv(np.asarray(nifti_affine, dtype=np.float64)) @ geometry.affine_ras()
    rot, shift = t[:3, :3], t[:3, 3]
    perm, flip = [], []
    for axis in range(3):  # dicom axis -> nifti axis
        column = rot[:, axis]
        target = int(np.argmax(np.abs(column)))
        sign = float(np.sign(column[target]))
        expected = np.zeros(3)
        expected[target] = sign
        if np.abs(column - expected).max() > GRID_TOL:
            raise ValueError(
                f"the mask grid is not the series grid (voxel axes or spacing differ: index map {np.round(rot, 3).tolist()})"
            )
        perm.append(target)
        flip.append(sign < 0)
    if len(set(perm)) != 3:
        raise ValueError("the mask grid is not the series grid (two axes map onto one)")
    for axis, (target, flipped) in enumerate(zip(perm, flip)):
        n = geometry.shape[axis]
        if nifti_shape[target] != n:
            raise ValueError(f"mask has {nifti_shape[target]} voxels along the axis where the series has {n}")
        start = (n - 1) if flipped else 0
        if abs(shift[target] - start) > GRID_TOL:
            raise ValueError(f"the mask grid is shifted against the series by {shift[target] - start:.2f} voxels")
    return perm, flip


def to_series_grid(data: np.ndarray, perm: list[int], flip: list[bool]) -> np.ndarray:
    """Reorder a NIfTI array onto ``[k, r, c]`` (pure; see :func:`grid_mapping`)."""
    out = np.transpose(data, perm)
    for axis, flipped in enumerate(flip):
        if flipped:
            out = np.flip(out, axis=axis)
    return np.ascontiguousarray(out)


def check_binary(data: np.ndarray) -> np.ndarray:
    """Return the mask as uint8 0/1; ValueError naming the other values found."""
    values = np.unique(data)
    other = values[(values != 0) & (values != 1)]
    if other.size:
        shown = ", ".join(f"{v:g}" for v in other[:5])
        raise ValueError(f"mask values must be 0/1, found {shown}{' ...' if other.size > 5 else ''}")
    return data.astype(np.uint8)


def read_mask(path: Path | str, geometry: Geometry) -> np.ndarray:
    """Read a 0/1 NIfTI mask and return it as uint8 ``[k, r, c]`` on the series grid."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise MaskError(path, f"unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MaskError(path, f"mask must be a 3-D volume, got shape {data.shape}")
    try:
        perm, flip = grid_mapping(geometry, img.affine, data.shape)
        return check_binary(to_series_grid(data, perm, flip))
    except ValueError as exc:
        raise MaskError(path, str(exc)) from exc
