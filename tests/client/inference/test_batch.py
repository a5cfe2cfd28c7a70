"""``hemexp predict --batch FOLDER``: every study scored with one model, a bad study reported and
skipped, one summary CSV whose values are those of each study's prediction.json, and no folder
name or header identifier anywhere in what it writes or prints."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from client.inference.batch import SUMMARY_FILE, find_studies
from client.inference.cli import hemexp_main
from tests.helpers.clinic import leaks, phi_strings, write_study


@pytest.mark.timeout(300)
def test_batch_scores_every_study_and_summarises_without_identifiers(
    tmp_path, clinic_study, clinic_checkpoint, capfd, one_torch_thread
):
    folder = tmp_path / "studies"
    shutil.copytree(clinic_study, folder / "MRN-PID-77441" / "ACC99182736")
    write_study(folder / "MRN-PID-77441" / "ACC99182737-followup", seed=1)
    write_study(folder / "MRN-PID-77441-B" / "ACC99182738", n_slices=2, seed=2)  # too short
    junk = folder / "MRN-PID-77441-C" / "ACC99182739"
    junk.mkdir(parents=True)
    junk.joinpath("report.txt").write_text("not an image")
    out = tmp_path / "out"
    code = hemexp_main(
        ["predict", "--batch", str(folder), "--model", str(clinic_checkpoint), "--out", str(out)]
        + ["--key-dir", str(tmp_path / "key"), "--device", "cpu"]
    )
    printed = capfd.readouterr()
    assert code == 0, printed.err
    assert "4 studies: 2 scored, 2 not scored" in printed.out and "studies" in printed.err  # the progress bar

    rows = list(csv.DictReader((out / SUMMARY_FILE).open()))
    assert sorted(r["status"] for r in rows) == ["ok", "ok", "rejected", "rejected"]
    reasons = sorted(r["reason"] for r in rows if r["status"] == "rejected")
    assert reasons[0].startswith("no usable axial CT image in the folder (not a DICOM file")
    assert reasons[1] == "too few slices (2)"
    for row in (r for r in rows if r["status"] == "ok"):
        result = json.loads((out / row["study"] / "prediction.json").read_text())
        assert float(row["volume_ml"]) == result["volume_ml"] and int(row["n_slices"]) == result["n_slices"]
        for name, p in result["markers"].items():
            assert float(row[f"p_{name}"]) == p and int(row[f"{name}_present"]) == result["present"][name]
    assert {r["study"] for r in rows if r["status"] == "ok"} == {p.name for p in out.iterdir() if p.is_dir()}

    assert not leaks([out], (printed.out, printed.err)), phi_strings()
    # the same folder gives the same pseudonyms (the site's key), so a re-run is comparable
    assert (
        hemexp_main(
            ["predict", "--batch", str(folder), "--model", str(clinic_checkpoint), "--out", str(tmp_path / "again")]
            + ["--key-dir", str(tmp_path / "key"), "--device", "cpu"]
        )
        == 0
    )
    again = list(csv.DictReader((tmp_path / "again" / SUMMARY_FILE).open()))
    assert [r["study"] for r in again] == [r["study"] for r in rows]


def test_find_studies_lists_folders_that_hold_files(tmp_path):
    for rel in ("a/s1/x.dcm", "a/s2/y.dcm", "b/z.dcm", "c/.hidden"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in find_studies(tmp_path)] == ["a/s1", "a/s2", "b"]


def test_predict_needs_a_study_or_a_batch(tmp_path, clinic_checkpoint, capsys):
    assert hemexp_main(["predict", "--model", str(clinic_checkpoint), "--out", str(tmp_path)]) == 2
    assert "either STUDY_DIR or --batch" in capsys.readouterr().err
