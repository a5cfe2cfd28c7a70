"""NIfTI masks land on the right voxels whatever their axis order; labels.csv validated by row."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.ingest.dicom import read_study
from client.ingest.labels import read_labels
from client.ingest.masks import MaskError, read_mask
from tests.helpers.data import head_phantom, write_series

SPACING = (4.0, 0.7, 0.9)
ORIGIN = (-100.0, -120.0, 30.0)


def _independent_ras_affine_krc() -> np.ndarray:
    """RAS affine of index (k, r, c) written from the test's own tags (axial, identity IOP)."""
    a = np.zeros((4, 4))
    a[:3, 0] = [0, 0, SPACING[0]]  # k: +z (S)
    a[:3, 1] = [0, -SPACING[1], 0]  # r: +y in LPS = -A in RAS
    a[:3, 2] = [-SPACING[2], 0, 0]  # c: +x in LPS = -R in RAS
    a[:3, 3] = [-ORIGIN[0], -ORIGIN[1], ORIGIN[2]]
    a[3, 3] = 1
    return a


@pytest.fixture
def series(tmp_path):
    hu = head_phantom((5, 14, 12))
    write_series(tmp_path / "s", hu, spacing=SPACING, origin=ORIGIN)
    return read_study(tmp_path / "s").geometry


def _known_mask(shape) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    for k, r, c in [(0, 1, 2), (2, 7, 3), (4, 13, 11), (3, 0, 10)]:
        m[k, r, c] = 1
    return m


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("flip", [(False, False, False), (True, False, True), (False, True, False)])
def test_permuted_and_flipped_masks_land_on_the_right_voxels(tmp_path, series, perm, flip) -> None:
    truth = _known_mask(series.shape)
    # Store the array with axes permuted and flipped; adjust the affine so world positions stay.
    data = np.transpose(truth, perm)
    a = _independent_ras_affine_krc()
    p = np.zeros((4, 4))
    p[3, 3] = 1
    for new_axis, old_axis in enumerate(perm):
        p[old_axis, new_axis] = 1
    affine = a @ p
    for axis, f in enumerate(flip):
        if f:
            data = np.flip(data, axis)
            n = data.shape[axis]
            q = np.eye(4)
            q[axis, axis] = -1
            q[axis, 3] = n - 1
            affine = affine @ q
    path = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
    mask = read_mask(path, series)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, truth)


def test_mask_on_another_grid_is_an_error_naming_the_file(tmp_path, series) -> None:
    path = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 14, 13), np.uint8), _independent_ras_affine_krc()), str(path))
    with pytest.raises(MaskError, match="other.nii.gz.*13 voxels"):
        read_mask(path, series)
    a = _independent_ras_affine_krc()
    a[:3, 1] *= 2  # other row spacing
    nib.save(nib.Nifti1Image(np.zeros((5, 14, 12), np.uint8), a), str(path))
    with pytest.raises(MaskError, match="not the series grid"):
        read_mask(path, series)
    a = _independent_ras_affine_krc()
    a[2, 3] += 8.0  # shifted two slices
    nib.save(nib.Nifti1Image(np.zeros((5, 14, 12), np.uint8), a), str(path))
    with pytest.raises(MaskError, match="shifted"):
        read_mask(path, series)


def test_mask_with_other_values_is_an_error(tmp_path, series) -> None:
    data = _known_mask(series.shape)
    data[1, 1, 1] = 2
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, _independent_ras_affine_krc()), str(path))
    with pytest.raises(MaskError, match="bad.nii.gz: mask values must be 0/1, found 2"):
        read_mask(path, series)


def test_unreadable_mask(tmp_path, series) -> None:
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(b"garbage")
    with pytest.raises(MaskError, match="junk.nii.gz: unreadable NIfTI"):
        read_mask(path, series)


HEADER = "patient_id,study_id,hypodensity,irregular_margin,blend_sign,fluid_level,expansion,location\n"


def test_labels_rows_are_validated_with_line_numbers(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(
        HEADER
        + "\n".join(
            [
                "P1,S1,1,0,,0,1,putamen",  # line 2: ok, blend not annotated
                "P2,S2,1,0,yes,0,,thalamus",  # line 3: bad value
                "P3,S3,0,0,0,0,0,lobar",  # line 4: unknown study
                "P4,S4,0,1,0,0,0,lobar",  # line 5: duplicate
                "P4,S4,0,1,0,0,0,lobar",  # line 6: duplicate
                "P5,S5,0,0,0,1,0,putamen",  # line 7: ok
            ]
        )
        + "\n"
    )
    known = {("P1", "S1"), ("P2", "S2"), ("P4", "S4"), ("P5", "S5")}
    table = read_labels(csv, known)
    assert set(table.labels) == {("P1", "S1"), ("P5", "S5")}
    np.testing.assert_array_equal(table.labels[("P1", "S1")], np.array([1, 0, np.nan, 0, 1], dtype=np.float32))
    assert np.isnan(table.labels[("P1", "S1")][2])  # empty is not annotated, never 0
    assert table.extras[("P1", "S1")]["location"] == "putamen"
    problems = {p.path.rsplit(":", 1)[1]: p.reason for p in table.problems}
    assert problems["3"] == "column blend_sign: value 'yes' is not 0, 1 or empty"
    assert "no DICOM folder" in problems["4"]
    assert "duplicate row" in problems["5"] and "duplicate row" in problems["6"] and "lines 5, 6" in problems["6"]


def test_missing_columns(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("patient_id,study_id,hypodensity\nP1,S1,1\n")
    table = read_labels(csv)
    assert "missing column(s) irregular_margin, blend_sign, fluid_level, expansion" in table.problems[0].reason
    v = table.labels[("P1", "S1")]
    assert v[0] == 1 and np.all(np.isnan(v[1:]))
    csv.write_text("patient,study_id,hypodensity\nP1,S1,1\n")
    table = read_labels(csv)
    assert table.labels == {} and "missing column(s) patient_id" in table.problems[0].reason
