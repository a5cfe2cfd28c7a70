"""``hemexp serve``: the hospital's DICOM node. The PACS (or scanner) pushes CT series to it with
C-STORE; a series that has received no instance for ``settle_s`` seconds is complete and is scored
(``run_prediction``, one study at a time, in arrival order); the DICOM SEG and SR go back to the
destination AE with C-STORE. Afterwards the received series and the results are deleted unless
``keep_dir`` is set.

Refused, with the reason logged and nothing scored: instances that are not CT Image Storage with
Modality CT (the sender gets status 0x0122, "SOP class not supported", with an error comment); a
complete series the reader cannot use (too few slices, uneven spacing, undecodable pixels: the
sender already got success for each instance, it gets no results). Every study ends in one audit
line with pseudonyms only.

The spool holds one folder per series, named by a random token; the files in it are numbered, so
nothing on disk or in a log is named after a patient, a UID or a file the sender chose.
"""

from __future__ import annotations

import logging
import queue
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt

from client.inference.audit import Pseudonymiser, audit_line, public_reason
from client.inference.predict import SEG_FILE, SR_FILE, ScoringModel, run_prediction
from client.ingest.dicom import StudyError

log = logging.getLogger("hemexp.serve")
audit_log = logging.getLogger("hemexp.audit")

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700


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
    settle_s: float = 10.0
    allowed_calling: tuple[str, ...] = ()  # calling AE titles accepted; () = any
    spool_dir: Path | None = None  # None: a temporary folder, removed at stop
    keep_dir: Path | None = None  # None: nothing kept after sending
    key_dir: Path | None = None  # the site's pseudonym key folder; None: the site cache's
    send_attempts: int = 3
    retry_wait_s: float = 10.0
    network_timeout_s: float = 30.0
    device: str = "cpu"


@dataclass
class SeriesJob:
    """One series being received: its spool folder and what the audit line names (pseudonyms)."""

    folder: Path
    study: str
    series: str
    instances: int = 0
    last_seen: float = field(default_factory=time.monotonic)


def refusal(ds: Dataset) -> str | None:
    """Why an incoming instance is not accepted for scoring, or None."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "") or "missing")
    if sop_class != CTImageStorage or modality != "CT":
        name = getattr(ds.get("SOPClassUID"), "name", sop_class) or "unknown"
        return f"not CT ({name}, Modality {modality})"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(keyword):
            return f"missing {keyword}: the instance cannot be placed in a series"
    return None


class Spool:
    """Received instances grouped by series, thread-safe: the network thread adds, the worker takes."""

    def __init__(self, root: Path, pseudonymise: Callable[[str, str], str]):
        self.root = root
        self.pseudonymise = pseudonymise
        self._lock = threading.Lock()
        self._series: dict[str, SeriesJob] = {}

    def add(self, study_uid: str, series_uid: str, encoded: bytes) -> SeriesJob:
        with self._lock:
            job = self._series.get(series_uid)
            if job is None:
                folder = self.root / secrets.token_hex(8)
                folder.mkdir(parents=True)
                job = SeriesJob(folder, self.pseudonymise("study", study_uid), self.pseudonymise("series", series_uid))
                self._series[series_uid] = job
            job.instances += 1
            job.last_seen = time.monotonic()
            (job.folder / f"{job.instances:05d}.dcm").write_bytes(encoded)
            return job

    def take_complete(self, settle_s: float, now: float | None = None) -> list[SeriesJob]:
        """Remove and return the series that received nothing for ``settle_s`` seconds, oldest first."""
        now = time.monotonic() if now is None else now
        with self._lock:
            done = [uid for uid, job in self._series.items() if now - job.last_seen >= settle_s]
            jobs = [self._series.pop(uid) for uid in done]
        return sorted(jobs, key=lambda j: j.last_seen)


def send_results(paths: list[Path], dest: Destination, calling_ae: str, timeout_s: float) -> None:
    """C-STORE every file to ``dest`` in one association; raises ConnectionError on any failure."""
    from pydicom import dcmread

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
    """The running node: a C-STORE SCP, a watcher that queues complete series, one scoring worker."""

    def __init__(self, config: NodeConfig, model: ScoringModel):
        self.config = config
        self.model = model
        self._tmp = None if config.spool_dir else tempfile.mkdtemp(prefix="hemexp-spool-")
        root = Path(config.spool_dir or self._tmp)
        self.spool = Spool(root / "incoming", Pseudonymiser(config.key_dir))
        self.results_root = root / "results"
        self.queue: queue.Queue[SeriesJob | None] = queue.Queue()
        self._stop = threading.Event()
        self._refused: set[str] = set()
        self._server = None
        self._threads: list[threading.Thread] = []

    # -- network thread ------------------------------------------------------------------------

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
            self.spool.add(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), event.encoded_dataset())
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

    # -- worker ----------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.config.settle_s / 4)):
            for job in self.spool.take_complete(self.config.settle_s):
                log.info("series=%s complete (%d instances), queued", job.series, job.instances)
                self.queue.put(job)

    def _work(self) -> None:
        while (job := self.queue.get()) is not None and not self._stop.is_set():
            self.process(job)

    def process(self, job: SeriesJob) -> str:
        """Score one complete series, send its results, write its audit line; returns the outcome."""
        t0 = time.perf_counter()
        out = self.results_root / job.folder.name
        fields: dict[str, object] = {"study": job.study, "series": job.series, "instances": job.instances}
        try:
            result = run_prediction(job.folder, self.model, out, self.model.device, dicom=True)
        except Exception as exc:  # a bad series must never stop the node
            outcome = "rejected" if isinstance(exc, StudyError) else "failed"
            fields["reason"] = public_reason(exc)
        else:
            fields["volume_ml"] = result["volume_ml"]
            fields["present"] = ",".join(k for k, v in result["present"].items() if v) or "none"
            outcome = self._send(out, fields)
        fields["model"] = f"sha256:{self.model.digest[:16]}"
        fields["seconds"] = time.perf_counter() - t0
        audit_log.info(audit_line(outcome=outcome, **fields))
        self._clean(job, out)
        return outcome

    def _send(self, out: Path, fields: dict[str, object]) -> str:
        cfg = self.config
        for attempt in range(1, cfg.send_attempts + 1):
            try:
                send_results([out / SEG_FILE, out / SR_FILE], cfg.destination, cfg.ae_title, cfg.network_timeout_s)
                fields["sent_to"] = str(cfg.destination)
                return "sent"
            except (ConnectionError, OSError, RuntimeError) as exc:
                fields["reason"] = f"{exc} (attempt {attempt} of {cfg.send_attempts})"
                if attempt < cfg.send_attempts and self._stop.wait(cfg.retry_wait_s):
                    break
        return "send-failed"

    def _clean(self, job: SeriesJob, out: Path) -> None:
        if self.config.keep_dir is not None:
            keep = Path(self.config.keep_dir) / job.study / job.series
            keep.mkdir(parents=True, exist_ok=True)
            shutil.move(str(job.folder), keep / "received")
            if out.exists():
                shutil.move(str(out), keep / "results")
        shutil.rmtree(job.folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Node:
        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = cfg.network_timeout_s
        # Every storage SOP class is negotiated, so that a wrong series is refused per instance
        # with a reason the sender can read instead of a bare "no presentation context".
        ae.supported_contexts = AllStoragePresentationContexts
        if cfg.allowed_calling:
            ae.require_called_aet = True
            ae.require_calling_aet = list(cfg.allowed_calling)
        for folder in (self.spool.root, self.results_root):  # leftovers of a node that was killed
            shutil.rmtree(folder, ignore_errors=True)
        self.spool.root.mkdir(parents=True, exist_ok=True)
        self._server = ae.start_server(
            (cfg.host, cfg.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)],
        )
        self._threads = [threading.Thread(target=t, daemon=True, name=t.__name__) for t in (self._watch, self._work)]
        for t in self._threads:
            t.start()
        log.info(
            "listening as %s on %s:%d; results to %s; a series is complete after %.0f s without a new instance",
            cfg.ae_title,
            cfg.host,
            self._server.server_address[1],
            cfg.destination,
            cfg.settle_s,
        )
        return self

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.config.port

    def stop(self) -> None:
        """Stop listening, finish the study being scored, drop the rest of the queue (its series stay in a
        configured spool until the next start, which clears it); remove a temporary spool."""
        if self._server is not None:
            self._server.shutdown()
        self._stop.set()
        self.queue.put(None)
        for t in self._threads:
            t.join(timeout=60)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


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
