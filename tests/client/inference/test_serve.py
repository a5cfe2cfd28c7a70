"""``hemexp serve`` between real DICOM peers on loopback: dcmtk's ``storescu`` pushes a generated
study, the node scores it and sends the SEG and SR to dcmtk's ``storescp``; a non-CT series is
refused per instance (the sender sees status 0122 and exits non-zero), a CT series too short to
score gets an audit line and no results, an unknown calling AE title is refused at association. A
node killed (SIGKILL) with series in its spool and restarted loses nothing: a slow push (two bursts
with a pause longer than ``--settle``) is scored only once whole, results written before the kill
are sent as they are, and every study gets exactly one SEG and one SR. Every process the test starts
is stopped by it; every wait is bounded."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage

from client.inference.audit import Pseudonymiser
from client.inference.serve import (
    RESULTS,
    Destination,
    InstanceInfo,
    Node,
    NodeConfig,
    SeriesJob,
    Spool,
    SpoolInUse,
    missing,
    refusal,
)
from tests.helpers.clinic import leaks, write_study
from tests.helpers.dicom_net import LOOPBACK, free_port, listening, need, stop, storescu, wait_for

REPO = Path(__file__).resolve().parents[3]
SEG_CLASS, SR_CLASS = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"


@contextmanager
def running(cmd: list[str], log: IO[str], ready: Callable[[], object], what: str) -> Iterator[subprocess.Popen]:
    """A process started, waited for (bounded) and always stopped."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
    try:
        wait_for(lambda: ready() or proc.poll() is not None, 180, what)
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        yield proc
    finally:
        stop(proc)


def storescp(port: int, folder: Path) -> list[str]:
    """dcmtk's storescp as the hospital PACS (AE title PACS); +uf: a file per object received, so a
    second copy of a result would show."""
    return [need("storescp"), "+uf", "-aet", "PACS", "-od", str(folder), str(port)]


def serve(checkpoint: Path, pacs_port: int, port: int, tmp_path: Path, *options: str) -> list[str]:
    """``hemexp serve`` as AE HEMEXP on loopback, accepting only the calling AE MODALITY."""
    cmd = [sys.executable, "-m", "client.inference.cli", "serve", "--model", str(checkpoint)]
    cmd += ["--dest", f"PACS@{LOOPBACK}:{pacs_port}", "--ae-title", "HEMEXP", "--host", LOOPBACK, "--port", str(port)]
    cmd += ["--allow-ae", "MODALITY", "--spool", str(tmp_path / "spool"), "--audit-log", str(tmp_path / "audit.log")]
    return cmd + ["--key-dir", str(tmp_path / "key"), "--device", "cpu", *options]


@pytest.fixture
def pacs(tmp_path) -> Iterator[tuple[int, Path]]:
    port, folder = free_port(), tmp_path / "pacs"
    folder.mkdir()
    with (
        (tmp_path / "storescp.log").open("w") as log,
        running(storescp(port, folder), log, lambda: listening(port), "storescp"),
    ):
        yield port, folder


@pytest.fixture
def node(tmp_path, pacs, clinic_checkpoint) -> Iterator[dict]:
    port, log_path = free_port(), tmp_path / "serve.log"
    cmd = serve(clinic_checkpoint, pacs[0], port, tmp_path, "--settle", "1")
    with (
        log_path.open("w") as log,
        running(cmd, log, lambda: "listening as HEMEXP" in log_path.read_text(), "the node"),
    ):
        yield {"port": port, "log": log_path, "audit": tmp_path / "audit.log", "spool": tmp_path / "spool"}


def spooled(spool: Path) -> list[Path]:
    """The files a node still holds (its lock file aside)."""
    return sorted(p for p in spool.rglob("*") if p.is_file() and p.name != ".lock")


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
    assert not spooled(node["spool"])  # every series gone once sent or refused
    assert not leaks([node["audit"], node["log"]])


def test_destination_parses_ae_host_port_and_names_a_bad_one():
    assert Destination.parse("PACS@10.1.2.3:104") == Destination("PACS", "10.1.2.3", 104)
    with pytest.raises(ValueError, match="AE@HOST:PORT"):
        Destination.parse("PACS:104")


def test_refusal_names_what_is_not_ct():
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.Modality = MRImageStorage, "MR"
    ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = "1.2.3"
    assert refusal(ds) == "not CT (MR Image Storage, Modality MR)"
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.2", "CT"
    assert refusal(ds) is None
    del ds.SeriesInstanceUID
    assert "missing SeriesInstanceUID" in refusal(ds)


def by_position(folder: Path) -> list[Path]:
    """A study's files from foot to head (the generated series are axial: the normal is +z)."""
    return sorted(
        folder.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
    )


def split(folder: Path, late: Callable[[list[Path]], list[Path]]) -> tuple[Path, Path]:
    """The first burst of a push (``folder``) and the files ``late`` picks, moved to a second burst."""
    rest = folder.with_name(folder.name + "-rest")
    rest.mkdir()
    for path in late(by_position(folder)):
        shutil.move(path, rest / path.name)
    return folder, rest


def with_count(folder: Path) -> Path:
    """ImagesInAcquisition (0020,1002) in every file: the header states how many slices the series has."""
    files = list(folder.iterdir())
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ImagesInAcquisition = len(files)
        ds.save_as(path)
    return folder


@pytest.mark.timeout(420)
def test_a_killed_node_resumes_its_spool_and_scores_a_slow_push_only_once_whole(tmp_path, clinic_checkpoint):
    settle = 2.0  # also the margin between the last Success and the kill
    pacs_port, port, pacs_dir = free_port(), free_port(), tmp_path / "pacs"
    pacs_dir.mkdir()
    whole = write_study(tmp_path / "whole", seed=11)  # scored while the PACS is down: results written, not sent
    last = write_study(tmp_path / "last", seed=12)  # received just before the kill: not scored yet
    # a slow push: slices 1-4 of 6 (the header says 6), the last two after a pause (and the restart)
    prefix, prefix_rest = split(
        with_count(write_study(tmp_path / "prefix", seed=13, shuffle_names=False)), lambda f: f[4:]
    )
    # one slice from the middle comes late (a retried instance); no count in the header, scrambled InstanceNumbers
    gap, gap_rest = split(write_study(tmp_path / "gap", seed=14), lambda f: f[2:3])
    # a long --incomplete-wait (never reached here); one send round before the kill
    options = ["--settle", str(settle), "--incomplete-wait", "600", "--retry-wait", "0.2", "--resend-every", "600"]
    audit, log1, log2 = tmp_path / "audit.log", tmp_path / "serve1.log", tmp_path / "serve2.log"
    cmd = serve(clinic_checkpoint, pacs_port, port, tmp_path, *options)

    with log1.open("w") as log, running(cmd, log, lambda: "listening as HEMEXP" in log1.read_text(), "node") as first:
        assert storescu(port, whole).returncode == 0
        (line,) = wait_for(lambda: audit_lines(audit), 120, "the failed send")
        assert "outcome=send-failed" in line and "instances=6" in line and "kept, resent every 600 s" in line
        for burst in (prefix, gap):
            assert storescu(port, burst).returncode == 0
        time.sleep(2.5 * settle)  # quiet for longer than --settle: the old node scored (or rejected) both here
        waiting = log1.read_text()
        assert waiting.count(", queued") == 1 and len(audit_lines(audit)) == 1  # only the whole series was taken
        assert "4 of 6 images (ImagesInAcquisition)" in waiting and "missing slice: a step of 10.00 mm" in waiting
        assert storescu(port, last).returncode == 0
        first.kill()  # SIGKILL right after the last Success: nothing of this series is scored yet
        first.wait(timeout=10)
    folders = [p for p in (tmp_path / "spool").iterdir() if p.is_dir()]
    assert len(folders) == 4 and sum((p / RESULTS).is_dir() for p in folders) == 1

    with (
        (tmp_path / "storescp.log").open("w") as scp_log,
        running(storescp(pacs_port, pacs_dir), scp_log, lambda: listening(pacs_port), "storescp"),
        log2.open("w") as log,
        running(cmd, log, lambda: "listening as HEMEXP" in log2.read_text(), "restarted node"),
    ):
        assert (
            "resumed from the spool: 1 series with results to send, 3 series to complete and score" in log2.read_text()
        )
        for burst in (prefix_rest, gap_rest):
            assert storescu(port, burst).returncode == 0
        wait_for(lambda: len(list(pacs_dir.iterdir())) >= 8, 180, "4 SEG and 4 SR")
        time.sleep(2 * settle)  # nothing more comes
        lines = audit_lines(audit)
        assert not spooled(tmp_path / "spool")

    got = Counter()
    for ds in (pydicom.dcmread(p) for p in pacs_dir.iterdir()):
        got[ds.StudyInstanceUID, str(ds.SOPClassUID)] += 1
        if str(ds.SOPClassUID) == SEG_CLASS:  # scored on every slice of its series
            assert len(ds.PerFrameFunctionalGroupsSequence) == 6
    studies = {
        name: pydicom.dcmread(next((tmp_path / name).iterdir())).StudyInstanceUID
        for name in ("whole", "last", "prefix", "gap")
    }
    assert got == {(uid, cls): 1 for uid in studies.values() for cls in (SEG_CLASS, SR_CLASS)}
    pseudonym = Pseudonymiser(tmp_path / "key")
    outcomes = {
        name: [line.split()[1] for line in lines if f"study={pseudonym('study', uid)}" in line]
        for name, uid in studies.items()
    }
    assert outcomes == {
        "whole": ["outcome=send-failed", "outcome=sent"],
        "last": ["outcome=sent"],
        "prefix": ["outcome=sent"],
        "gap": ["outcome=sent"],
    }
    assert all("instances=6" in line for line in lines)
    assert not leaks([audit, log1, log2])


def spool_with(tmp_path: Path, study: Path) -> tuple[Spool, list[Path]]:
    spool = Spool(tmp_path / "spool", lambda kind, uid: f"{kind}-{uid[-4:]}")
    spool.open()
    return spool, by_position(study)


def receive(spool: Spool, path: Path) -> SeriesJob:
    return spool.add(pydicom.dcmread(path), path.read_bytes())


def test_spool_waits_for_a_whole_series_and_replaces_a_resent_instance(tmp_path):
    spool, files = spool_with(tmp_path, write_study(tmp_path / "study", n_slices=5, seed=3))
    for path in files[:2] + files[3:]:
        receive(spool, path)
    receive(spool, files[0])  # the PACS sends an instance again: same SOP Instance UID, one file
    (job,) = spool._series.values()
    assert job.instances == 4 and sorted(p.name for p in job.received.iterdir()) == [
        f"{i:05d}.dcm" for i in range(1, 5)
    ]
    assert "1.2." not in str(job.folder)  # spool folders are random tokens, not UIDs
    t = job.last_seen
    assert spool.take_ready(5.0, 60.0, now=t + 1.0) == []  # not quiet yet
    assert spool.take_ready(5.0, 60.0, now=t + 10.0) == [] and job.waiting.startswith("missing slice")
    receive(spool, files[2])  # the missing slice arrives
    assert spool.take_ready(5.0, 60.0, now=job.last_seen + 10.0) == [job] and job.incomplete is None
    assert spool.take_ready(5.0, 60.0, now=job.last_seen + 20.0) == []  # taken once

    other = by_position(write_study(tmp_path / "other", n_slices=4, seed=4))
    partial = receive(spool, other[0])
    receive(spool, other[1])
    receive(spool, other[3])
    assert spool.take_ready(5.0, 60.0, now=partial.last_seen + 10.0) == []  # a slice missing: holds on
    assert spool.take_ready(5.0, 60.0, now=partial.last_seen + 61.0) == [partial]  # given up: refused, not scored
    assert partial.incomplete.startswith("missing slice")


def test_spool_resumes_what_a_killed_node_left(tmp_path):
    spool, files = spool_with(tmp_path, write_study(tmp_path / "study", n_slices=4, seed=5))
    for path in files[:3]:
        receive(spool, path)
    (job,) = spool._series.values()
    (job.received / ".00009.dcm.tmp").write_bytes(b"half an instance")  # killed while writing
    (job.folder / "results.partial").mkdir()  # killed while scoring
    scored = receive(spool, next(write_study(tmp_path / "scored", n_slices=3, seed=6).iterdir()))
    (scored.results).mkdir()  # killed before its results were sent
    with pytest.raises(SpoolInUse):  # a second node on the same spool
        Spool(spool.root, spool.pseudonymise).open()
    spool.close()  # the kill: the kernel drops the lock

    again = Spool(spool.root, spool.pseudonymise)
    again.open()
    (to_send,) = again.resume()
    assert to_send.folder == scored.folder and to_send.study == scored.study
    (resumed,) = again._series.values()
    assert resumed.folder == job.folder and resumed.series == job.series and resumed.files == job.files
    assert sorted(p.name for p in job.folder.rglob("*")) == ["00001.dcm", "00002.dcm", "00003.dcm", "received"]
    receive(again, files[3])  # the rest of the series merges into its folder
    assert resumed.instances == 4 and (resumed.received / "00004.dcm").is_file()


def info(z: float, number: int | None = None, **kwargs) -> InstanceInfo:
    geometry = {"orientation": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), "grid": ((0.5, 0.5), 512, 512), **kwargs}
    return InstanceInfo(number, (0.0, 0.0, z), acquisition="1", stated=None, localizer=False, **geometry)


def test_missing_names_what_a_partial_series_lacks_and_accepts_what_the_headers_cannot_tell():
    whole = [info(5.0 * k, 10 + k) for k in range(6)]
    assert missing(whole) is None
    assert (
        missing(whole[:2] + whole[3:])
        == "missing slice: a step of 10.00 mm along the slice normal where the series has 5.00 mm"
    )
    scrambled = [info(5.0 * k, n) for k, n in zip(range(6), (40, 3, 17, 9, 28, 11))]
    assert missing(scrambled) is None and missing(scrambled[:4] + scrambled[5:]).startswith("missing slice")
    # a protocol with two slice thicknesses: consecutive InstanceNumbers across the longer step, nothing missing
    assert missing([info(z, n) for n, z in enumerate((0.0, 2.5, 5.0, 10.0, 15.0), 1)]) is None
    assert missing([info(z, n) for n, z in zip((1, 2, 3, 5, 6), (0.0, 2.5, 5.0, 10.0, 15.0))]) is not None
    stated = [InstanceInfo(k + 1, (0.0, 0.0, 5.0 * k), (1.0, 0, 0, 0, 1.0, 0), (), "2", 6, False) for k in range(6)]
    assert missing(stated[:4]) == "4 of 6 images (ImagesInAcquisition)" and missing(stated) is None
    scout = InstanceInfo(1, (0.0, 0.0, 90.0), (1.0, 0, 0, 0, 0, -1.0), (), "2", 6, True)
    assert missing([*stated, scout]) is None  # a localizer in the series is neither counted nor placed
    unplaced = [InstanceInfo(n, None, None, (), "", None, False) for n in (1, 2, 4)]
    assert missing(unplaced) == "1 InstanceNumber(s) missing"
    # not waited for: mixed geometry (more instances cannot mend it) and a contiguous run without a count
    assert missing([*whole[:3], info(30.0, 16, grid=((0.7, 0.7), 512, 512))]) is None
    assert missing(whole[:3]) is None


def test_a_series_given_up_as_incomplete_is_refused_and_a_scoring_error_keeps_the_series(tmp_path, caplog):
    class Broken:  # not a ScoringModel: scoring fails for a reason that is not the series'
        digest, device = "0" * 64, "cpu"

    config = NodeConfig(Destination("PACS", LOOPBACK, 1), spool_dir=tmp_path / "spool", key_dir=tmp_path / "key")
    node = Node(config, Broken())
    node.spool.open()
    files = by_position(write_study(tmp_path / "study", n_slices=4, seed=7))
    for path in files[:1] + files[2:]:
        job = receive(node.spool, path)
    (given_up,) = node.spool.take_ready(1.0, 60.0, now=job.last_seen + 61.0)
    with caplog.at_level(logging.INFO, logger="hemexp.audit"):
        assert node.score(given_up) == "incomplete"
    assert "outcome=incomplete" in caplog.text and 'reason="missing slice: a step of 10.00 mm' in caplog.text
    assert not spooled(node.spool.root)  # refused: gone, nothing scored, nothing sent
    for path in files:
        job = receive(node.spool, path)
    (whole,) = node.spool.take_ready(1.0, 60.0, now=job.last_seen + 2.0)
    with caplog.at_level(logging.INFO, logger="hemexp.audit"):
        assert node.score(whole) == "failed"
    assert "kept for the next start" in caplog.text and node.to_send.empty()
    assert len(list(whole.received.iterdir())) == 4 and not (whole.folder / "results.partial").exists()
    node.spool.close()
