"""The site walk, ``check`` and the cache: bad studies reported, good ones used, cache reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.data.cache import build_site_cache, open_cache
from client.ingest.dicom import Problem
from client.site_tools.check import check_site, format_table
from client.site_tools.cli import flwr_client_main
from common.config import PreprocessConfig
from tests.helpers.data import PHI, head_phantom, write_series, write_site

CFG = PreprocessConfig(size=32)


@pytest.fixture
def site(tmp_path) -> Path:
    return write_site(tmp_path / "site-01", n_studies=4, window=(0.0, 90.0))


def _break_site(site: Path) -> None:
    """Add one study of each bad kind next to the good ones."""
    # two axial series in one study
    write_series(site / "dicom" / "P900" / "S900", head_phantom((3, 16, 16)))
    write_series(site / "dicom" / "P900" / "S900" / "b", head_phantom((3, 16, 16)), seed=4)
    # a study with only non-DICOM content
    (site / "dicom" / "P901" / "S901").mkdir(parents=True)
    (site / "dicom" / "P901" / "S901" / "readme.txt").write_text("hello")
    # a mask of the wrong shape on a good study
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4)), str(site / "masks" / "P001" / "S001.nii.gz"))
    # a malformed label row
    with (site / "labels.csv").open("a") as fh:
        fh.write("P002,S999,1,1,1,1,1,lobar\n")


def test_check_reports_bad_studies_and_keeps_the_good_ones(site) -> None:
    _break_site(site)
    report = check_site(site)
    status = {(s.patient_id, s.study_id): s for s in report.studies}
    assert status[("P900", "S900")].status == "rejected"
    assert "more than one axial CT series" in status[("P900", "S900")].problems[0].reason
    assert status[("P901", "S901")].status == "rejected"
    assert "readme.txt" in status[("P901", "S901")].problems[1].path
    assert status[("P001", "S001")].status == "ok" and not status[("P001", "S001")].has_mask
    assert any(
        "S001.nii.gz" in p.path and "used without its mask" in p.reason for p in status[("P001", "S001")].problems
    )
    assert [s.study_id for s in report.usable] == ["S000", "S001", "S002", "S003"]
    assert any(p.path.endswith("labels.csv:6") and "no DICOM folder" in p.reason for p in report.problems)
    summary = report.label_summary()
    assert summary["hypodensity"] == {"positive": 2, "negative": 2, "missing": 0}
    assert summary["blend_sign"]["missing"] == 4
    assert report.site.window == (0.0, 90.0)
    table = format_table(report)
    assert "REJECTED" in table and "4 of 6 studies usable" in table


def test_check_json_cli_shape_and_exit_status(site, capsys, tmp_path) -> None:
    _break_site(site)
    assert flwr_client_main(["check", str(site), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {s["status"] for s in out["studies"]} == {"ok", "rejected"}
    one = out["studies"][0]
    assert set(one) >= {"patient_id", "study_id", "status", "problems"}
    assert all(set(p) == {"path", "reason"} for s in out["studies"] for p in s["problems"])
    assert any("labels.csv:6" in p["path"] for p in out["problems"])
    empty = tmp_path / "empty-site"
    (empty / "dicom").mkdir(parents=True)
    assert flwr_client_main(["check", str(empty)]) == 1  # nothing usable


def test_cache_holds_the_preprocessed_data_and_no_identifier(site, tmp_path) -> None:
    cache, problems = build_site_cache(site, tmp_path / "cache", CFG)
    assert not cache.hit and problems == []
    assert cache.index["preprocess"]["window"] == [0.0, 90.0]  # site.toml wins
    assert cache.n_slices == 4 * 6 and cache.images.shape == (24, 32, 32) and cache.images.dtype == np.uint8
    assert isinstance(cache.images, np.memmap)
    # slice labels: study labels on hematoma slices, zero elsewhere, NaN kept
    for s in cache.studies:
        lab = cache.slice_labels[s["start"] : s["stop"]]
        holds = cache.masks[s["start"] : s["stop"]].reshape(6, -1).sum(1) > CFG.min_mask_pixels
        assert holds.any()
        study = np.array([np.nan if v is None else v for v in s["labels"]], dtype=np.float32)
        np.testing.assert_array_equal(lab[holds], np.broadcast_to(study, lab[holds].shape))
        assert np.all(lab[~holds] == 0)
    blob = b"".join(p.read_bytes() for p in cache.path.rglob("*") if p.is_file())
    for value in [*PHI.values(), "P000", "S000", "P001", "DOE^PATIENT0"]:
        assert value.encode() not in blob, value
    patients = {s["patient"] for s in cache.studies}
    assert len(patients) == 4 and all(p.startswith("P-") for p in patients)


def test_cache_hit_on_rerun_and_miss_after_a_config_or_data_change(site, tmp_path) -> None:
    first, _ = build_site_cache(site, tmp_path / "cache", CFG)
    again, _ = build_site_cache(site, tmp_path / "cache", CFG)
    assert again.hit and again.path == first.path
    assert again.index["studies"][0]["patient"] == first.index["studies"][0]["patient"]  # stable pseudonyms
    other, _ = build_site_cache(site, tmp_path / "cache", PreprocessConfig(size=32, denoise=False))
    assert not other.hit and other.path != first.path
    (site / "labels.csv").write_text((site / "labels.csv").read_text().replace("P000,S000,0", "P000,S000,1"))
    changed, _ = build_site_cache(site, tmp_path / "cache", CFG)
    assert not changed.hit and changed.path != first.path
    reopened = open_cache(first.path)
    np.testing.assert_array_equal(reopened.images, first.images)


def test_prepare_cli(site, tmp_path, capsys) -> None:
    args = ["prepare", str(site), "--cache-dir", str(tmp_path / "c"), "--size", "32"]
    assert flwr_client_main(args) == 0
    assert "cache built" in capsys.readouterr().out
    assert flwr_client_main(args) == 0
    assert "cache reused" in capsys.readouterr().out


def test_cache_records_the_model_pixel_size(site, tmp_path) -> None:
    from client.preprocessing.pipeline import model_pixel_mm

    cache, _ = build_site_cache(site, tmp_path / "cache", CFG)
    # write_site: 48 x 48 slices at 0.8 mm, padded square side 48 spread over 32 pixels
    assert cache.studies[0]["pixel_mm"] == pytest.approx([0.8 * 48 / 32] * 2)
    assert model_pixel_mm((0.5, 0.6), (400, 512), 256) == pytest.approx((1.0, 1.2))


def _insert_localizer(study_dir: Path) -> Path:
    """One lateral scout written into an axial series' folder with that series' UIDs (as some
    scanners export it): only its ImageType (0008,0008) tells it apart."""
    import pydicom

    axial = pydicom.dcmread(next(study_dir.glob("*.dcm")), stop_before_pixels=True)
    (path,) = write_series(
        study_dir, head_phantom((1, 48, 48)), row_dir=(0.0, 1.0, 0.0), col_dir=(0.0, 0.0, -1.0), seed=77
    )
    ds = pydicom.dcmread(path)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.PatientID, ds.StudyInstanceUID = axial.PatientID, axial.StudyInstanceUID
    ds.SeriesInstanceUID = axial.SeriesInstanceUID
    ds.save_as(path)
    return path


def test_a_localizer_inside_the_axial_series_is_named_and_the_series_used(site, tmp_path, capsys) -> None:
    from simulations.cli import hemexp_main

    study_dir = site / "dicom" / "P001" / "S001"
    n_axial = len(list(study_dir.iterdir()))
    scout = _insert_localizer(study_dir)
    named = Problem(str(scout), "localizer (ImageType LOCALIZER): not part of the axial series, left out")
    # check: the study stays usable with every axial slice, the scout is named with its reason
    report = check_site(site)
    study = next(s for s in report.studies if (s.patient_id, s.study_id) == ("P001", "S001"))
    assert study.status == "ok" and study.n_slices == n_axial == 6 and study.has_mask
    assert list(study.problems) == [named]
    assert [s.n_slices for s in report.usable] == [6, 6, 6, 6]
    assert hemexp_main(["check", str(site)]) == 0
    out = capsys.readouterr().out
    assert f"  {scout}: localizer (ImageType LOCALIZER): not part of the axial series, left out" in out
    assert "4 of 4 studies usable, 24 slices" in out
    # the cache: built from the other slices, the scout among the build's problems and in prepare's log
    cache, problems = build_site_cache(site, tmp_path / "cache", CFG)
    assert problems == [named]
    assert cache.n_slices == 4 * n_axial and [s["stop"] - s["start"] for s in cache.studies] == [n_axial] * 4
    assert hemexp_main(["prepare", str(site), "--cache-dir", str(tmp_path / "c2"), "--size", "32"]) == 0
    log = capsys.readouterr().err
    assert f"problem: {scout}: localizer (ImageType LOCALIZER): not part of the axial series, left out" in log
