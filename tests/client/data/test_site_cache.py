"""The site walk, ``check`` and the cache: bad studies reported, good ones used, cache reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.data.cache import build_site_cache, open_cache
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
