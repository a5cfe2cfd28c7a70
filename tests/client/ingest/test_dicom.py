"""DICOM ingest: exact HU and slice order, and a clear error for every kind of bad input."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from client.ingest.dicom import Geometry, StudyError, read_study, to_hounsfield
from common.metrics import hematoma_volume_ml
from tests.helpers.data import head_phantom, write_series


def test_ct_small_hu_matches_independent_computation(tmp_path: Path) -> None:
    src = get_testdata_file("CT_small.dcm", download=False)
    shutil.copy(src, tmp_path / "IM0001")
    study = read_study(tmp_path)
    ds = pydicom.dcmread(src)
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns).astype(np.float64)
    expected = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected[raw == float(ds.PixelPaddingValue)] = -1000.0
    expected = np.maximum(expected, -1000.0)
    assert study.volume.shape == (1, 128, 128)
    np.testing.assert_array_equal(study.volume[0], expected.astype(np.float32))
    assert study.geometry.origin == pytest.approx(tuple(float(v) for v in ds.ImagePositionPatient))
    assert study.geometry.pixel_spacing == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))


def test_jpeg2000_ct_decodes_to_the_same_hu_as_an_independent_decoder(tmp_path: Path) -> None:
    from PIL import Image
    from pydicom.encaps import generate_frames

    src = get_testdata_file("693_J2KI.dcm", download=False)
    shutil.copy(src, tmp_path / "a.dcm")
    study = read_study(tmp_path)
    ds = pydicom.dcmread(src)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    # Pillow returns the signed 16-bit samples offset by 2**15.
    stored = np.asarray(Image.open(io.BytesIO(frame))).astype(np.float64) - 32768
    expected = np.maximum(stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept), -1000.0)
    expected[stored == float(ds.PixelPaddingValue)] = -1000.0
    np.testing.assert_array_equal(study.volume[0], expected.astype(np.float32))


@pytest.mark.parametrize(
    "signed,slope,intercept", [(True, 1.0, -1024.0), (False, 1.0, -1024.0), (True, 0.5, -1000.0), (False, 2.0, -1024.0)]
)
@pytest.mark.parametrize("reverse", [False, True])
def test_shuffled_names_and_positions_give_exact_hu_in_position_order(
    tmp_path, signed, slope, intercept, reverse
) -> None:
    hu = head_phantom((5, 24, 20))
    if slope == 2.0:
        hu = np.round(hu / 2) * 2  # representable at this slope
    write_series(
        tmp_path, hu, signed=signed, slope=slope, intercept=intercept, reverse=reverse, spacing=(4.0, 0.7, 0.9)
    )
    study = read_study(tmp_path)
    np.testing.assert_array_equal(study.volume, hu)
    g = study.geometry
    assert g.shape == (5, 24, 20)
    assert g.slice_spacing == pytest.approx(4.0)  # from positions, not the (wrong) SliceThickness
    assert g.pixel_spacing == (0.7, 0.9)
    assert g.origin == pytest.approx((-100.0, -120.0, 30.0))


def test_padding_value_becomes_air(tmp_path) -> None:
    hu = head_phantom((3, 16, 16))
    pad = np.zeros(hu.shape, dtype=bool)
    pad[:, :3, :] = True
    write_series(tmp_path, hu, padding=-2000, padding_mask=pad, intercept=0.0)
    vol = read_study(tmp_path).volume
    assert np.all(vol[pad] == -1000.0)
    np.testing.assert_array_equal(vol[~pad], hu[~pad])


def test_oblique_series_is_sorted_along_its_normal(tmp_path) -> None:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    row, col = (1.0, 0.0, 0.0), (0.0, c, s)
    hu = np.stack([np.full((8, 8), v, dtype=np.float32) for v in (10, 20, 30, 40)])
    write_series(tmp_path, hu, row_dir=row, col_dir=col, reverse=True)
    study = read_study(tmp_path)
    assert [float(v) for v in study.volume[:, 0, 0]] == [10, 20, 30, 40]
    np.testing.assert_allclose(study.geometry.normal, np.cross(row, col), atol=1e-6)


def test_index_to_world_affine_matches_image_position_of_every_slice(tmp_path) -> None:
    hu = head_phantom((4, 10, 12))
    paths = write_series(tmp_path, hu, spacing=(3.0, 0.5, 0.6))
    g = read_study(tmp_path).geometry
    a = g.affine_lps()
    positions = sorted(
        (np.array([float(v) for v in pydicom.dcmread(p).ImagePositionPatient]) for p in paths), key=lambda p: p[2]
    )
    for k, pos in enumerate(positions):
        np.testing.assert_allclose(a @ [k, 0, 0, 1], [*pos, 1], atol=1e-3)
    # column index moves along row_dir by PixelSpacing[1]
    np.testing.assert_allclose(a @ [0, 0, 1, 1] - a @ [0, 0, 0, 1], [0.6, 0, 0, 0], atol=1e-6)
    assert hematoma_volume_ml(1, g.pixel_spacing, g.slice_spacing) == pytest.approx(3.0 * 0.5 * 0.6 / 1000)


def test_slice_spacing_of_a_gantry_tilted_stack_is_the_distance_between_planes() -> None:
    # each slice shifted 2 mm along the column direction as it moves 5 mm along the normal (a sheared stack):
    # the planes are 5 mm apart, not |step| = 5.39 mm, and a voxel is the parallelepiped the affine spans
    g = Geometry((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 2.0, 5.0), (0.5, 0.6), (3, 4, 4))
    assert g.slice_spacing == pytest.approx(5.0)
    voxel_mm3 = abs(np.linalg.det(g.affine_lps()[:3, :3]))
    assert voxel_mm3 == pytest.approx(0.5 * 0.6 * 5.0)
    assert hematoma_volume_ml(1, g.pixel_spacing, g.slice_spacing) == pytest.approx(voxel_mm3 / 1000)


@pytest.mark.parametrize("kind", ["LOCALIZER", "SCOUT"])
def test_localizer_is_dropped_and_named(tmp_path, kind) -> None:
    hu = head_phantom((3, 12, 12))
    axial = write_series(tmp_path, hu)
    scout = write_series(tmp_path / "scout", hu[:1], row_dir=(0.0, 1.0, 0.0), col_dir=(0.0, 0.0, -1.0), seed=3)
    ds = pydicom.dcmread(scout[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", kind]
    ds.save_as(scout[0])
    study = read_study(tmp_path)
    np.testing.assert_array_equal(study.volume, hu)
    assert set(study.sources) == set(axial)
    assert study.skipped_localizers == 1
    assert [(p.path, p.reason) for p in study.problems] == [
        (str(scout[0]), f"localizer (ImageType {kind}): not part of the axial series, left out")
    ]


def test_only_a_localizer_rejects_the_study_naming_it(tmp_path) -> None:
    scout = write_series(tmp_path, head_phantom((1, 12, 12)), row_dir=(0.0, 1.0, 0.0), col_dir=(0.0, 0.0, -1.0))
    ds = pydicom.dcmread(scout[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(scout[0])
    with pytest.raises(StudyError, match="no usable axial CT image") as info:
        read_study(tmp_path)
    assert f"{scout[0]}: localizer (ImageType LOCALIZER)" in _reasons(info.value)


def _reasons(exc: StudyError) -> str:
    return " | ".join(f"{p.path}: {p.reason}" for p in exc.problems)


def test_two_axial_series_are_an_error_naming_both(tmp_path) -> None:
    hu = head_phantom((3, 12, 12))
    write_series(tmp_path, hu, series_uid="1.2.3.4.1")
    write_series(tmp_path / "b", hu, series_uid="1.2.3.4.2", seed=2)
    with pytest.raises(StudyError, match="more than one axial CT series") as info:
        read_study(tmp_path)
    assert "1.2.3.4.1" in str(info.value) and "1.2.3.4.2" in str(info.value)


def test_duplicate_positions_name_the_files(tmp_path) -> None:
    hu = head_phantom((3, 12, 12))
    paths = write_series(tmp_path, hu)
    shutil.copy(paths[1], tmp_path / "copy.dcm")
    ds = pydicom.dcmread(tmp_path / "copy.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "copy.dcm")
    with pytest.raises(StudyError, match="duplicate slice positions") as info:
        read_study(tmp_path)
    assert "copy.dcm" in _reasons(info.value) or paths[1].name in _reasons(info.value)


def test_uneven_positions_name_the_gap(tmp_path) -> None:
    hu = head_phantom((5, 12, 12))
    paths = write_series(tmp_path, hu, shuffle_names=False)
    paths[2].unlink()  # a missing slice
    with pytest.raises(StudyError, match="uneven slice spacing") as info:
        read_study(tmp_path)
    assert "slice003.dcm" in _reasons(info.value)


def test_mixed_rows_columns(tmp_path) -> None:
    write_series(tmp_path, head_phantom((3, 12, 12)), series_uid="1.2.9")
    odd = write_series(
        tmp_path / "x", head_phantom((1, 14, 12)), series_uid="1.2.9", origin=(-100.0, -120.0, 45.0), seed=5
    )
    with pytest.raises(StudyError, match="mixed Rows/Columns") as info:
        read_study(tmp_path)
    assert odd[0].name in _reasons(info.value) and "14x12" in _reasons(info.value)


def test_non_ct_missing_pixels_non_dicom_and_truncated_files_are_reported_and_skipped(tmp_path) -> None:
    hu = head_phantom((4, 12, 12))
    write_series(tmp_path, hu)
    mr = write_series(tmp_path / "mr", hu[:1], modality="MR", origin=(0.0, 0.0, 500.0), seed=7)
    nopix = write_series(tmp_path / "np", hu[:1], origin=(0.0, 0.0, 600.0), seed=8)
    ds = pydicom.dcmread(nopix[0])
    del ds.PixelData
    ds.save_as(nopix[0])
    (tmp_path / "notes.txt").write_text("not a dicom file")
    trunc = write_series(tmp_path / "t", hu[:1], origin=(0.0, 0.0, 700.0), seed=9)
    data = trunc[0].read_bytes()
    trunc[0].write_bytes(data[:200])
    study = read_study(tmp_path)
    assert study.volume.shape[0] == 4
    reasons = {Path(p.path).name: p.reason for p in study.problems}
    assert "not a CT image (Modality=MR)" in reasons[mr[0].name]
    assert "no pixel data" in reasons[nopix[0].name]
    assert "not a DICOM file" in reasons["notes.txt"]
    assert "truncated DICOM file" in reasons[trunc[0].name]


def test_truncated_pixel_data_rejects_the_study_naming_the_file(tmp_path) -> None:
    paths = write_series(tmp_path, head_phantom((3, 16, 16)))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 100])
    with pytest.raises(StudyError) as info:
        read_study(tmp_path)
    assert paths[1].name in _reasons(info.value)


def test_undecodable_transfer_syntax_names_the_syntax(tmp_path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    paths = write_series(tmp_path, head_phantom((2, 16, 16)))
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\0" * 60])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[0], enforce_file_format=True)
    with pytest.raises(StudyError, match="could not be decoded") as info:
        read_study(tmp_path)
    assert "JPEG-LS" in _reasons(info.value) and paths[0].name in _reasons(info.value)


def test_missing_folder_and_empty_folder(tmp_path) -> None:
    with pytest.raises(StudyError, match="does not exist"):
        read_study(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudyError, match="no usable axial CT image"):
        read_study(tmp_path / "empty")


def test_to_hounsfield_formula() -> None:
    stored = np.array([[0, 100, -2000, 3000]], dtype=np.int16)
    hu = to_hounsfield(stored, 0.5, -1024.0, (-2000.0, -2000.0))
    np.testing.assert_array_equal(hu, [[-1000.0, -974.0, -1000.0, 476.0]])
