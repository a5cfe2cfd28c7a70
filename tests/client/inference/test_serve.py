"""``hemexp serve`` between real DICOM peers on loopback: dcmtk's ``storescu`` pushes a generated
study, the node scores it and sends the SEG and SR to dcmtk's ``storescp``; a non-CT series is
refused per instance (the sender sees status 0122 and exits non-zero), a CT series too short to
score gets an audit line and no results, an unknown calling AE title is refused at association.
Every process the test starts is stopped by it; every wait is bounded."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage

from client.inference.serve import Destination, Spool, refusal
from tests.helpers.clinic import leaks, write_study
from tests.helpers.dicom_net import LOOPBACK, free_port, listening, need, stop, storescu, wait_for

REPO = Path(__file__).resolve().parents[3]
SEG_CLASS, SR_CLASS = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def pacs(tmp_path) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp as the hospital PACS (AE title PACS), storing what it receives."""
    port, folder = free_port(), tmp_path / "pacs"
    folder.mkdir()
    log = (tmp_path / "storescp.log").open("w")
    proc = subprocess.Popen([need("storescp"), "-aet", "PACS", "-od", str(folder), str(port)], stdout=log, stderr=log)
    try:
        wait_for(lambda: listening(port), 20, "storescp")
        yield port, folder
    finally:
        stop(proc)
        log.close()


@pytest.fixture
def node(tmp_path, pacs, clinic_checkpoint) -> Iterator[dict]:
    """``hemexp serve`` as AE HEMEXP on loopback, accepting only the calling AE MODALITY."""
    port, log_path = free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "client.inference.cli", "serve", "--model", str(clinic_checkpoint)]
    cmd += ["--dest", f"PACS@{LOOPBACK}:{pacs[0]}", "--ae-title", "HEMEXP", "--host", LOOPBACK, "--port", str(port)]
    cmd += ["--settle", "1", "--allow-ae", "MODALITY", "--spool", str(tmp_path / "spool")]
    cmd += ["--audit-log", str(tmp_path / "audit.log"), "--key-dir", str(tmp_path / "key"), "--device", "cpu"]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
    try:
        wait_for(lambda: "listening as HEMEXP" in log_path.read_text() or proc.poll() is not None, 180, "the node")
        assert proc.poll() is None, log_path.read_text()
        yield {"port": port, "log": log_path, "audit": tmp_path / "audit.log", "spool": tmp_path / "spool"}
    finally:
        stop(proc)
        log.close()


def audit_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def as_mr(paths: list[Path]) -> None:
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        ds.save_as(p)


@pytest.mark.timeout(420)
def test_storescu_to_serve_to_storescp_round_trip_and_refusals(tmp_path, pacs, node, clinic_study):
    pacs_dir = pacs[1]
    t0 = time.monotonic()
    sent = storescu(node["port"], clinic_study)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    files = wait_for(lambda: len(list(pacs_dir.iterdir())) >= 2 and sorted(pacs_dir.iterdir()), 180, "SEG and SR")
    elapsed = time.monotonic() - t0
    received = {str(ds.SOPClassUID): ds for ds in (pydicom.dcmread(f) for f in files)}
    assert set(received) == {SEG_CLASS, SR_CLASS}, received.keys()
    seg, sr = received[SEG_CLASS], received[SR_CLASS]
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(clinic_study.iterdir())]
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.PatientID == sources[0].PatientID  # filed with the patient's study
    referenced = {
        g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for g in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced == {s.SOPInstanceUID for s in sources}
    # the SR's volume is the received SEG's mask volume
    volume = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for group in sr.ContentSequence[-1].ContentSequence
        for item in group.ContentSequence
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "118565006"
    ]
    assert volume == [pytest.approx(np.count_nonzero(seg.pixel_array) * 5.0 * 0.8 * 0.9 / 1000, abs=1e-4)]
    (line,) = wait_for(lambda: audit_lines(node["audit"]), 30, "the audit line")
    assert "outcome=sent" in line and f"sent_to=PACS@{LOOPBACK}:{pacs[0]}" in line and "instances=6" in line
    print(f"round trip storescu -> serve -> storescp: {elapsed:.1f} s for a 6-slice study")

    # a non-CT series: refused per instance, the sender sees the status
    mr = tmp_path / "mr"
    as_mr(write_study(mr, n_slices=3, seed=5).iterdir())
    refused = storescu(node["port"], mr)
    assert refused.returncode != 0 and "Refused: SOPClassNotSupported" in refused.stdout + refused.stderr
    # a CT series too short to score: stored, then rejected with its reason, nothing sent
    short = storescu(node["port"], write_study(tmp_path / "short", n_slices=2, seed=6))
    assert short.returncode == 0, short.stdout + short.stderr
    lines = wait_for(lambda: len(audit_lines(node["audit"])) >= 2 and audit_lines(node["audit"]), 60, "rejection")
    assert "outcome=rejected" in lines[1] and 'reason="too few slices (2)"' in lines[1] and "instances=2" in lines[1]
    # an AE title the node does not know: refused at association
    stranger = storescu(node["port"], clinic_study, calling="STRANGER")
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stdout + stranger.stderr

    log = wait_for(
        lambda: "refused association from STRANGER" in node["log"].read_text() and node["log"].read_text(), 20, "log"
    )
    assert "not CT (MR Image Storage, Modality MR)" in log
    assert len(list(pacs_dir.iterdir())) == 2  # nothing came back for the refused series
    assert not list((node["spool"] / "incoming").iterdir()) and not list((node["spool"] / "results").iterdir())
    assert not leaks([node["audit"], node["log"]])


def test_destination_parses_ae_host_port_and_names_a_bad_one():
    assert Destination.parse("PACS@10.1.2.3:104") == Destination("PACS", "10.1.2.3", 104)
    with pytest.raises(ValueError, match="AE@HOST:PORT"):
        Destination.parse("PACS:104")


def test_refusal_names_what_is_not_ct():
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.Modality = MRImageStorage, "MR"
    ds.StudyInstanceUID = ds.SeriesInstanceUID = "1.2.3"
    assert refusal(ds) == "not CT (MR Image Storage, Modality MR)"
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.2", "CT"
    assert refusal(ds) is None
    del ds.SeriesInstanceUID
    assert "missing SeriesInstanceUID" in refusal(ds)


def test_spool_groups_by_series_and_releases_a_series_after_the_quiet_time(tmp_path):
    spool = Spool(tmp_path, lambda kind, uid: f"{kind}-{uid[-1]}")
    a1 = spool.add("1.1", "2.1", b"a")
    spool.add("1.1", "2.2", b"b")
    spool.add("1.1", "2.1", b"c")
    assert a1.instances == 2 and sorted(p.name for p in a1.folder.iterdir()) == ["00001.dcm", "00002.dcm"]
    assert spool.take_complete(5.0, now=a1.last_seen + 1.0) == []
    done = spool.take_complete(5.0, now=a1.last_seen + 10.0)
    assert [j.series for j in done] == ["series-2", "series-1"]  # quiet longest first: 2.1 got the last instance
    assert spool.take_complete(5.0, now=a1.last_seen + 20.0) == []  # taken once
    assert "2.1" not in str(a1.folder)  # spool folders are random tokens, not UIDs
