"""``hemexp serve``: the hospital's DICOM node. The PACS (or scanner) pushes CT series to it with
C-STORE; a series is scored (``run_prediction``, one series at a time, in arrival order) once it is
complete, and its DICOM SEG and SR go back to the destination AE with C-STORE.

Complete means: no instance arrived for ``settle_s`` seconds *and* the instances received form the
whole series as far as their headers tell (``missing``: the count the header states, no missing
slice along the slice normal). A series that still looks incomplete waits until ``incomplete_wait_s``
seconds passed without a new instance and is then refused (audit ``outcome=incomplete``), never
scored on part of the head.

Nothing the PACS was told is received gets lost: each instance is on disk (fsync) before the sender
gets *Success*; the spool is persistent; a series folder leaves the spool only after the destination
answered *Success* to its SEG and SR, or after its audit line when it is refused (rejected,
incomplete); results not sent are tried again every ``resend_s`` seconds; a restarted node, even
after SIGKILL, resumes every series in its spool: results already written are sent as they are
(same SOP Instance UIDs, never scored twice), the others are completed and scored. docs/clinic.md
says what is guaranteed and what is not.

Refused, with the reason logged and nothing scored: instances that are not CT Image Storage with
Modality CT (the sender gets status 0x0122, "SOP class not supported", with an error comment); a
complete series the reader cannot use (too few slices, uneven spacing, undecodable pixels: the
sender already got success for each instance, it gets no results). Every series ends in one audit
line (sent, rejected, incomplete), with pseudonyms only; a first failed send round and an unexpected
error add a line before it.

The spool holds one folder per series, named by a random token; the files in it are numbered, so
nothing on disk or in a log is named after a patient, a UID or a file the sender chose.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import secrets
import shutil
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt

from client.data.cache import DEFAULT_CACHE
from client.inference.audit import Pseudonymiser, audit_line, public_reason
from client.inference.predict import SEG_FILE, SR_FILE, ScoringModel, run_prediction
from client.ingest.dicom import DUPLICATE_TOL_MM, ORIENTATION_TOL, StudyError, is_localizer

log = logging.getLogger("hemexp.serve")
audit_log = logging.getLogger("hemexp.audit")

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700

#: Where the series wait when no ``--spool`` is given: persistent, beside the site's pseudonym key.
DEFAULT_SPOOL = DEFAULT_CACHE / "serve-spool"
#: In a series folder: the instances, the results being written, the results written.
RECEIVED, PARTIAL, RESULTS = "received", "results.partial", "results"
#: Series folders whose results were acknowledged (or that cannot be scored), on their way out of the spool.
FINISHED = "finished"
LOCK_FILE = ".lock"
_TOKEN = re.compile(r"[0-9a-f]{16}")
#: A step along the slice normal this much longer than the series' shortest step leaves room for a slice.
GAP_FACTOR = 1.5


@dataclass(frozen=True)
class Destination:
    """Where the results go: an AE title at host:port (the PACS, or a viewer's store SCP)."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@HOST:PORT``."""
        try:
            ae_title, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            return cls(ae_title, host, int(port))
        except ValueError:
            raise ValueError(f"destination must be AE@HOST:PORT, got {text!r}") from None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``hemexp serve`` is configured with (docs/clinic.md)."""

    destination: Destination
    ae_title: str = "HEMEXP"
    host: str = "0.0.0.0"
    port: int = 11112
    settle_s: float = 10.0  # quiet time before a series is checked for completeness
    incomplete_wait_s: float = 300.0  # quiet time after which a series that still looks incomplete is refused
    allowed_calling: tuple[str, ...] = ()  # calling AE titles accepted; () = any
    spool_dir: Path | None = None  # None: DEFAULT_SPOOL (persistent)
    keep_dir: Path | None = None  # None: nothing kept after sending
    key_dir: Path | None = None  # the site's pseudonym key folder; None: the site cache's
    send_attempts: int = 3  # attempts per round, retry_wait_s apart
    retry_wait_s: float = 10.0
    resend_s: float = 60.0  # between rounds, for results not yet acknowledged
    network_timeout_s: float = 30.0
    device: str = "cpu"


# -- completeness ----------------------------------------------------------------------------------


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class InstanceInfo:
    """What the completeness check needs of one instance, read from its header (kept in memory only)."""

    number: int | None  # InstanceNumber (0020,0013)
    position: tuple[float, ...] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient
    grid: tuple[object, ...]  # PixelSpacing, Rows, Columns
    acquisition: str  # AcquisitionNumber (0020,0012): ImagesInAcquisition counts per acquisition
    stated: int | None  # ImagesInAcquisition (0020,1002)
    localizer: bool

    @classmethod
    def of(cls, ds: Dataset) -> InstanceInfo:
        """Never raises: a malformed tag reads as absent (the reader reports it when the series is scored)."""
        return cls(
            number=_int(ds.get("InstanceNumber")),
            position=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            grid=(_floats(ds.get("PixelSpacing"), 2), _int(ds.get("Rows")), _int(ds.get("Columns"))),
            acquisition=str(ds.get("AcquisitionNumber", "") or ""),
            stated=_int(ds.get("ImagesInAcquisition")),
            localizer=is_localizer(ds),
        )


def missing(infos: Iterable[InstanceInfo]) -> str | None:
    """Why the received instances do not look like the whole series yet, or None when they do.

    Incomplete: fewer images than ImagesInAcquisition (0020,1002) states for their acquisition; or,
    sorted along the slice normal, a step longer than GAP_FACTOR x the shortest one, unless the
    InstanceNumbers on both sides are consecutive (then the scanner left that step: nothing can be
    missing between them); without positions, a hole in the InstanceNumbers. Mixed orientation,
    pixel spacing or matrix is not waited for: more instances cannot mend it, and the reader rejects
    the series with its reason. A contiguous run of slices without a stated count looks complete:
    nothing in the headers tells it from a shorter series (docs/clinic.md)."""
    images = [i for i in infos if not i.localizer]
    by_acquisition: dict[str, list[InstanceInfo]] = defaultdict(list)
    for info in images:
        by_acquisition[info.acquisition].append(info)
    for group in by_acquisition.values():
        stated = Counter(i.stated for i in group if i.stated).most_common(1)
        if stated and len(group) < stated[0][0]:
            return f"{len(group)} of {stated[0][0]} images (ImagesInAcquisition)"
    placed = [i for i in images if i.position is not None and i.orientation is not None]
    if len(placed) >= 2:
        return _gap_along_normal(placed)
    numbers = sorted({i.number for i in images if i.number is not None})
    if len(numbers) == len(images) >= 2 and numbers[-1] - numbers[0] + 1 > len(numbers):
        return f"{numbers[-1] - numbers[0] + 1 - len(numbers)} InstanceNumber(s) missing"
    return None


def _gap_along_normal(placed: list[InstanceInfo]) -> str | None:
    ref = placed[0]
    orientation = np.asarray(ref.orientation)
    for info in placed:
        if info.grid != ref.grid or np.abs(np.asarray(info.orientation) - orientation).max() > ORIENTATION_TOL:
            return None  # mixed geometry: the reader rejects it
    normal = np.cross(orientation[:3], orientation[3:])
    order = sorted(placed, key=lambda i: float(np.dot(i.position, normal)))
    steps = np.diff([float(np.dot(i.position, normal)) for i in order])
    distinct = steps[steps > DUPLICATE_TOL_MM]
    if not distinct.size:
        return None  # one position only: the reader rejects the duplicates
    unit = float(distinct.min())
    numbers = [i.number for i in order]
    numbered = None not in numbers and len(set(np.sign(np.diff(numbers)))) == 1 and 0 not in np.diff(numbers)
    for k in np.flatnonzero(steps > GAP_FACTOR * unit):
        if numbered and abs(numbers[k + 1] - numbers[k]) == 1:  # type: ignore[operator]
            continue
        return f"missing slice: a step of {steps[k]:.2f} mm along the slice normal where the series has {unit:.2f} mm"
    return None


def refusal(ds: Dataset) -> str | None:
    """Why an incoming instance is not accepted for scoring, or None."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "") or "missing")
    if sop_class != CTImageStorage or modality != "CT":
        name = getattr(ds.get("SOPClassUID"), "name", sop_class) or "unknown"
        return f"not CT ({name}, Modality {modality})"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            return f"missing {keyword}: the instance cannot be placed in a series"
    return None


# -- the spool -------------------------------------------------------------------------------------


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write under a hidden name, fsync, rename: a file under its final name is whole and on disk,
    so *Success* is answered only for an instance that survives a kill or a power cut."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


@dataclass
class SeriesJob:
    """One series in the spool: its folder, what the audit line names (pseudonyms), and in memory only
    the SOP Instance UIDs received (a re-sent instance replaces its file) with their headers' geometry."""

    folder: Path
    study: str
    series: str
    infos: dict[str, InstanceInfo] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> file name in received/
    last_seen: float = field(default_factory=time.monotonic)
    waiting: str | None = None  # why it looked incomplete at the last check (logged once per reason)
    incomplete: str | None = None  # set when it is given up as incomplete
    failed_rounds: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def instances(self) -> int:
        return len(self.infos)

    def next_name(self) -> str:
        """The file name of a new instance: numbered on from the highest in the folder."""
        return f"{max((int(n[:5]) for n in self.files.values()), default=0) + 1:05d}.dcm"

    @property
    def received(self) -> Path:
        return self.folder / RECEIVED

    @property
    def results(self) -> Path:
        return self.folder / RESULTS


class SpoolInUse(RuntimeError):
    """Two nodes on one spool would score and send each other's series."""


class Spool:
    """The persistent spool, thread-safe: the network threads add, the watcher takes, the workers finish.

    Layout: ``<token>/received/00001.dcm ...`` (the instances), ``<token>/results.partial/`` (results
    being written), ``<token>/results/`` (results written, to be sent), ``finished/<token>/`` (done:
    on its way to ``--keep`` or the bin). Every step is a rename, so a kill leaves a state ``resume`` knows.
    """

    def __init__(self, root: Path, pseudonymise: Callable[[str, str], str]):
        self.root = root
        self.pseudonymise = pseudonymise
        self._lock = threading.Lock()
        self._series: dict[str, SeriesJob] = {}  # being received, by SeriesInstanceUID
        self._lock_file: IO[str] | None = None

    def open(self) -> None:
        """Take the spool for this process (an advisory lock the kernel drops when the process dies)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        handle = (self.root / LOCK_FILE).open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise SpoolInUse(f"the spool {self.root} is in use by another running hemexp serve") from None
        self._lock_file = handle

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @property
    def receiving(self) -> int:
        """How many series are being received (or wait to be complete)."""
        with self._lock:
            return len(self._series)

    def add(self, ds: Dataset, encoded: bytes) -> SeriesJob:
        """Store one instance durably; the sender may be told *Success* once this returns."""
        sop_uid, series_uid = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
        info = InstanceInfo.of(ds)
        with self._lock:
            job = self._series.get(series_uid)
            if job is None:
                folder = self.root / secrets.token_hex(8)
                (folder / RECEIVED).mkdir(parents=True)
                job = SeriesJob(
                    folder,
                    self.pseudonymise("study", str(ds.StudyInstanceUID)),
                    self.pseudonymise("series", series_uid),
                )
                self._series[series_uid] = job
            name = job.files.get(sop_uid) or job.next_name()
            write_durably(job.received / name, encoded)
            job.files[sop_uid], job.infos[sop_uid] = name, info
            job.last_seen = time.monotonic()
            return job

    def take_ready(self, settle_s: float, incomplete_wait_s: float, now: float | None = None) -> list[SeriesJob]:
        """Remove and return, oldest first, the series quiet for ``settle_s`` that look complete, and those
        quiet for ``incomplete_wait_s`` that still do not (``incomplete`` says why)."""
        now = time.monotonic() if now is None else now
        ready, waiting = [], []
        with self._lock:
            for uid, job in list(self._series.items()):
                quiet = now - job.last_seen
                if quiet < settle_s:
                    continue
                reason = missing(job.infos.values())
                if reason is not None and quiet < incomplete_wait_s:
                    if reason != job.waiting:
                        job.waiting = reason
                        waiting.append(job)
                    continue
                job.incomplete = reason
                ready.append(self._series.pop(uid))
        for job in waiting:
            log.info(
                "series=%s incomplete (%d instances): %s; waiting up to %.0f s without a new instance",
                job.series,
                job.instances,
                job.waiting,
                incomplete_wait_s,
            )
        return sorted(ready, key=lambda j: j.last_seen)

    def resume(self) -> list[SeriesJob]:
        """Pick up what a previous run left (killed or stopped): finish the finished, drop half-written
        files, and rebuild every series folder. Returns the series whose results are written (to be sent
        as they are); the others are back among the series being received, so that the rest of a series
        still merges into its folder, and are scored when complete."""
        to_send: list[SeriesJob] = []
        for folder in sorted((self.root / FINISHED).glob("*")):
            self.discard(folder)
        folders = sorted((p for p in self.root.iterdir() if p.is_dir() and _TOKEN.fullmatch(p.name)), key=_age)
        for folder in folders:
            shutil.rmtree(folder / PARTIAL, ignore_errors=True)
            for tmp in (folder / RECEIVED).glob(".*"):
                tmp.unlink(missing_ok=True)
            job, uids = self._rebuild(folder)
            if job is None:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if job.results.is_dir():
                to_send.append(job)
            elif uids[1] in self._series:  # a second folder of one series (instances after it was taken)
                self._merge(job, self._series[uids[1]])
            else:
                self._series[uids[1]] = job
        return to_send

    def _rebuild(self, folder: Path) -> tuple[SeriesJob | None, tuple[str, str]]:
        job, uids, newest = None, ("", ""), 0.0
        for path in sorted((folder / RECEIVED).glob("*.dcm")):
            try:
                ds = dcmread(path, stop_before_pixels=True)
                sop_uid, uids = str(ds.SOPInstanceUID), (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
            except Exception:  # noqa: BLE001 - renamed in only when whole: damaged since; the reader reports it
                log.warning("an unreadable file in a spooled series: kept for the reader to report")
                continue
            if job is None:
                job = SeriesJob(folder, self.pseudonymise("study", uids[0]), self.pseudonymise("series", uids[1]))
            job.files[sop_uid], job.infos[sop_uid] = path.name, InstanceInfo.of(ds)
            newest = max(newest, path.stat().st_mtime)
        if job is not None:  # quiet since its newest file, on this run's clock
            job.last_seen = time.monotonic() - max(0.0, time.time() - newest)
        return job, uids

    def _merge(self, job: SeriesJob, into: SeriesJob) -> None:
        for uid, name in job.files.items():
            if uid not in into.files:
                target = into.next_name()
                os.replace(job.received / name, into.received / target)
                into.files[uid], into.infos[uid] = target, job.infos[uid]
        into.last_seen = max(into.last_seen, job.last_seen)
        shutil.rmtree(job.folder, ignore_errors=True)

    def finish(self, job: SeriesJob, keep_dir: Path | None) -> None:
        """The one step that takes a series out of the spool (a rename): after it, a restart neither
        scores nor sends it again. Then it goes to ``keep_dir`` or is deleted."""
        finished = self.root / FINISHED / job.folder.name
        finished.parent.mkdir(exist_ok=True)
        os.replace(job.folder, finished)
        _sync_dir(self.root)
        self.discard(finished, keep_dir, (job.study, job.series))

    def discard(self, finished: Path, keep_dir: Path | None = None, names: tuple[str, str] | None = None) -> None:
        if keep_dir is not None:
            if names is None:
                job, _ = self._rebuild(finished)
                names = (job.study, job.series) if job else ("unknown", finished.name)
            keep = Path(keep_dir) / names[0] / names[1]
            if keep.exists():  # the same series scored again
                keep = keep.with_name(f"{names[1]}-{finished.name[:6]}")
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(finished), keep)
        shutil.rmtree(finished, ignore_errors=True)


def _age(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)


def send_results(paths: list[Path], dest: Destination, calling_ae: str, timeout_s: float) -> None:
    """C-STORE every file to ``dest`` in one association; raises ConnectionError on any failure."""
    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"association with {dest} not established")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code != STATUS_SUCCESS:
                raise ConnectionError(f"{dest} answered C-STORE with status {code if code is None else hex(code)}")
    finally:
        assoc.release()


class Node:
    """The running node: a C-STORE SCP, a watcher that queues complete series and due resends, one
    scoring worker and one sending worker (a PACS outage does not hold up scoring)."""

    def __init__(self, config: NodeConfig, model: ScoringModel):
        self.config = config
        self.model = model
        self.spool = Spool(Path(config.spool_dir or DEFAULT_SPOOL), Pseudonymiser(config.key_dir))
        self.to_score: queue.Queue[SeriesJob | None] = queue.Queue()
        self.to_send: queue.Queue[SeriesJob | None] = queue.Queue()
        self._resend: list[tuple[float, SeriesJob]] = []
        self._resend_lock = threading.Lock()
        self._stop = threading.Event()
        self._refused: set[str] = set()
        self._server = None
        self._threads: list[threading.Thread] = []

    # -- network threads -------------------------------------------------------------------------

    def _on_store(self, event) -> Dataset | int:
        ds = event.dataset
        reason = refusal(ds)
        if reason is not None:
            series = self.spool.pseudonymise("series", str(ds.get("SeriesInstanceUID", "")))
            if series not in self._refused:  # one line per refused series, not one per instance
                self._refused.add(series)
                log.warning(
                    "refused series=%s from %s: %s; only axial CT Image Storage series are scored",
                    series,
                    event.assoc.requestor.ae_title,
                    reason,
                )
            answer = Dataset()
            answer.Status = STATUS_SOP_CLASS_NOT_SUPPORTED
            answer.ErrorComment = f"hemexp scores CT only: {reason}"[:64]  # LO: 64 characters
            return answer
        try:
            self.spool.add(ds, event.encoded_dataset())
        except OSError as exc:  # disk full: the sender may retry later
            log.error("cannot spool an instance: %s", type(exc).__name__)
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS

    def _on_rejected(self, event) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "refused association from %s (%s) calling %s: not an allowed calling/called AE title",
            requestor.ae_title,
            requestor.address,
            event.assoc.acceptor.ae_title,
        )

    # -- workers -----------------------------------------------------------------------------------

    def _watch(self) -> None:
        cfg = self.config
        while not self._stop.wait(min(1.0, cfg.settle_s / 4)):
            for job in self.spool.take_ready(cfg.settle_s, cfg.incomplete_wait_s):
                if job.incomplete is None:
                    log.info("series=%s complete (%d instances), queued", job.series, job.instances)
                self.to_score.put(job)
            now = time.monotonic()
            with self._resend_lock:
                due = [job for when, job in self._resend if when <= now]
                self._resend = [(when, job) for when, job in self._resend if when > now]
            for job in due:
                self.to_send.put(job)

    def _score_loop(self) -> None:
        self._drain(self.to_score, self.score)

    def _send_loop(self) -> None:
        self._drain(self.to_send, self.deliver)

    def _drain(self, jobs: queue.Queue[SeriesJob | None], step: Callable[[SeriesJob], str]) -> None:
        """A worker that never dies: whatever goes wrong with one series (the disk, say) is logged by
        kind, the series stays in the spool for the next start, and the worker goes on."""
        while (job := jobs.get()) is not None and not self._stop.is_set():
            try:
                step(job)
            except Exception as exc:  # noqa: BLE001
                log.error("series=%s left in the spool for the next start: %s", job.series, type(exc).__name__)

    def _audit(self, outcome: str, job: SeriesJob, **fields: object) -> None:
        fields = {"study": job.study, "series": job.series, "instances": job.instances, **fields}
        fields["model"] = f"sha256:{self.model.digest[:16]}"
        fields["seconds"] = time.perf_counter() - job.started
        audit_log.info(audit_line(outcome=outcome, **fields))

    def score(self, job: SeriesJob) -> str:
        """Score one series into ``results/`` (written whole, then renamed) and queue it for sending; a
        series that cannot be scored ends here with its audit line. Returns the outcome so far."""
        job.started = time.perf_counter()
        if job.incomplete is not None:
            log.warning("series=%s still incomplete, not scored: %s", job.series, job.incomplete)
            self._audit("incomplete", job, reason=job.incomplete)
            self.spool.finish(job, self.config.keep_dir)
            return "incomplete"
        partial = job.folder / PARTIAL
        shutil.rmtree(partial, ignore_errors=True)
        try:
            run_prediction(job.received, self.model, partial, self.model.device, dicom=True)
            for path in partial.iterdir():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(partial, job.results)
            _sync_dir(job.folder)
        except Exception as exc:  # a bad series must never stop the node
            shutil.rmtree(partial, ignore_errors=True)
            if not isinstance(exc, StudyError):  # not the series' fault (memory, a bug): tried again at the next start
                self._audit("failed", job, reason=f"{public_reason(exc)}; kept for the next start")
                return "failed"
            self._audit("rejected", job, reason=public_reason(exc))
            self.spool.finish(job, self.config.keep_dir)
            return "rejected"
        self.to_send.put(job)
        return "scored"

    def deliver(self, job: SeriesJob) -> str:
        """Send the written SEG and SR; only a *Success* answer to both takes the series out of the spool.
        A round that fails schedules the next one ``resend_s`` later (the first failure is audited)."""
        cfg = self.config
        reason = ""
        for attempt in range(1, cfg.send_attempts + 1):
            try:
                send_results(
                    [job.results / SEG_FILE, job.results / SR_FILE],
                    cfg.destination,
                    cfg.ae_title,
                    cfg.network_timeout_s,
                )
                break
            except (ConnectionError, OSError, RuntimeError) as exc:
                reason = f"{exc} (attempt {attempt} of {cfg.send_attempts})"
                if self._stop.is_set() or (attempt < cfg.send_attempts and self._stop.wait(cfg.retry_wait_s)):
                    return "stopped"  # stays in the spool: the next start sends it
        else:
            job.failed_rounds += 1
            if job.failed_rounds == 1:
                self._audit(
                    "send-failed",
                    job,
                    **self._summary(job),
                    reason=f"{reason}; kept, resent every {cfg.resend_s:.0f} s",
                )
            else:
                log.warning("series=%s: results still not sent (round %d): %s", job.series, job.failed_rounds, reason)
            with self._resend_lock:
                self._resend.append((time.monotonic() + cfg.resend_s, job))
            return "send-failed"
        self._audit("sent", job, **self._summary(job), sent_to=str(cfg.destination))
        self.spool.finish(job, cfg.keep_dir)
        return "sent"

    @staticmethod
    def _summary(job: SeriesJob) -> dict[str, object]:
        """Volume and markers present, from the written prediction.json (also after a restart)."""
        try:
            result = json.loads((job.results / "prediction.json").read_text())
        except (OSError, ValueError):
            return {}
        return {
            "volume_ml": float(result["volume_ml"]),
            "present": ",".join(k for k, v in result["present"].items() if v) or "none",
        }

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Node:
        """Lock the spool, resume what a previous run left, then listen."""
        cfg = self.config
        self.spool.open()
        to_send = self.spool.resume()
        for job in to_send:
            self.to_send.put(job)
        pending = self.spool.receiving
        if to_send or pending:
            log.info(
                "resumed from the spool: %d series with results to send, %d series to complete and score",
                len(to_send),
                pending,
            )
        ae = AE(ae_title=cfg.ae_title)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = cfg.network_timeout_s
        # Every storage SOP class is negotiated, so that a wrong series is refused per instance
        # with a reason the sender can read instead of a bare "no presentation context".
        ae.supported_contexts = AllStoragePresentationContexts
        if cfg.allowed_calling:
            ae.require_called_aet = True
            ae.require_calling_aet = list(cfg.allowed_calling)
        self._server = ae.start_server(
            (cfg.host, cfg.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)],
        )
        self._threads = [
            threading.Thread(target=t, daemon=True, name=t.__name__)
            for t in (self._watch, self._score_loop, self._send_loop)
        ]
        for t in self._threads:
            t.start()
        log.info(
            "listening as %s on %s:%d; results to %s; a series is scored when complete and quiet for %.0f s "
            "(one that looks incomplete is refused after %.0f s); spool %s",
            cfg.ae_title,
            cfg.host,
            self._server.server_address[1],
            cfg.destination,
            cfg.settle_s,
            cfg.incomplete_wait_s,
            self.spool.root,
        )
        return self

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.config.port

    def stop(self) -> None:
        """Stop listening, finish the series being scored or sent; everything not yet sent stays in the
        spool and is resumed at the next start."""
        if self._server is not None:
            self._server.shutdown()
        self._stop.set()
        self.to_score.put(None)
        self.to_send.put(None)
        for t in self._threads:
            t.join(timeout=60)
        self.spool.close()


def serve_forever(config: NodeConfig, model: ScoringModel) -> None:
    """Run until SIGINT/SIGTERM."""
    import signal

    node = Node(config, model).start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("stopping")
    node.stop()
