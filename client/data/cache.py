"""The site cache: preprocess a site once, then train from memory-mapped arrays every round.

Each Flower message starts a fresh ClientApp process (docs/design.md §6), so a site must never redo
its preprocessing per round. The cache is keyed by a hash of the inputs (file names, sizes and
modification times under the site folder) and of the preprocessing config, and holds no patient
identifier: patient and study ids become keyed pseudonyms (HMAC with a secret kept on the site).

Layout of ``CACHE_DIR/<site_id>-<key16>/`` (format version in ``index.json``):

- ``images.u8``  uint8 ``[N, S, S]`` preprocessed slices (raw, C order, read with ``np.memmap``)
- ``masks.u8``   uint8 ``[N, S, S]`` hematoma masks (0 where a study has no mask; see ``mask_known``)
- ``slice_labels.f4`` float32 ``[N, len(LABELS)]`` slice labels (NaN = not annotated / unknown)
- ``index.json``: key, preprocessing config, labels, ``n_slices``, image size and per study:
  pseudonyms, slice range, mask known, study labels, model-pixel size in mm, location, the
  ``site`` column of a pooled dataset (``group``), the patient's ``patient_order`` (see
  ``patient_orders``), and per slice the brain fraction and the number of hematoma pixels.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.ingest.dicom import Problem
from client.ingest.layouts import iter_studies
from client.ingest.site_settings import is_site_file, read_site_settings
from client.ingest.study import StudyRecord, label_vector_or_missing
from client.preprocessing.pipeline import model_pixel_mm, preprocess_volume
from common.config import LABELS, MARKERS, PreprocessConfig

CACHE_FORMAT = 5  # 5: slice_mm along the slice normal (gantry-tilted stacks), common.metrics.hematoma_volume_ml
#: Where `flwr-client prepare` and a SuperNode without ``cache-dir`` keep the site cache.
DEFAULT_CACHE = Path.home() / ".cache" / "hemexp"
SECRET_FILE = ".pseudonym-key"


def pseudonym(secret: bytes, kind: str, identifier: str) -> str:
    """Stable keyed pseudonym: the same id maps to the same name at this site, and cannot be reversed."""
    digest = hmac.new(secret, f"{kind}:{identifier}".encode(), hashlib.sha256).hexdigest()
    return f"{kind[0].upper()}-{digest[:12]}"


def site_secret(cache_root: Path) -> bytes:
    """The site's pseudonym key, created once and kept beside the caches (never sent anywhere)."""
    path = cache_root / SECRET_FILE
    if not path.is_file():
        cache_root.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        os.chmod(path, 0o600)
    return bytes.fromhex(path.read_text().strip())


def inputs_key(site_dir: Path, cfg: PreprocessConfig) -> str:
    """Hash of every input file's path, size and mtime, plus the preprocessing config. The site's own
    files (``site.toml``, its approvals, its privacy ledger: ``is_site_file``) are left out: what of
    them shapes the cache (the window) is in ``cfg``, and they change between rounds without a rebuild."""
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "preprocess": cfg.to_dict()}, sort_keys=True).encode())
    for path in sorted(
        p for p in site_dir.rglob("*") if p.is_file() and not (p.parent == site_dir and is_site_file(p.name))
    ):
        st = path.stat()
        h.update(f"{path.relative_to(site_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def slice_labels(study_labels: np.ndarray, mask: np.ndarray | None, n_slices: int, min_pixels: int) -> np.ndarray:
    """Per-slice labels (docs/design.md §4): the study's labels where the slice holds hematoma, else 0.

    Without a mask, which slices hold the hematoma is unknown: every slice's labels are NaN.
    ``expansion`` is a study property: it is copied onto hematoma slices like the markers.
    """
    if mask is None:
        return np.full((n_slices, len(LABELS)), np.nan, dtype=np.float32)
    holds = mask.reshape(n_slices, -1).sum(axis=1) > min_pixels
    out = np.zeros((n_slices, len(LABELS)), dtype=np.float32)
    out[holds] = study_labels
    return out


def patient_orders(patient_ids: list[str]) -> list[int]:
    """Per study, its patient's rank among the site's distinct patients, ordered by an unkeyed hash.

    What the patient-wise split ranks (``client.data.dataset.split_slices``): it depends on the
    data only, never on the random pseudonym key, so every copy of a site's data splits alike.
    The number names nobody: the ids are discarded, and the hash order hides the order of the ids
    (admission numbers sort by date). The hash is never stored (a public hash of a guessable id
    could be reversed by trying ids).
    """
    ranked = sorted(set(patient_ids), key=lambda pid: hashlib.sha256(f"patient:{pid}".encode()).digest())
    rank = {pid: i for i, pid in enumerate(ranked)}
    return [rank[pid] for pid in patient_ids]


@dataclass(frozen=True)
class SiteCache:
    """A built cache, memory-mapped. Arrays are read-only views of the files."""

    path: Path
    index: dict
    images: np.ndarray
    masks: np.ndarray
    slice_labels: np.ndarray
    hit: bool = False

    @property
    def studies(self) -> list[dict]:
        return self.index["studies"]

    @property
    def n_slices(self) -> int:
        return int(self.index["n_slices"])

    def slice_study(self) -> np.ndarray:
        """Study index of every slice (int32 ``[N]``)."""
        out = np.empty(self.n_slices, dtype=np.int32)
        for i, s in enumerate(self.studies):
            out[s["start"] : s["stop"]] = i
        return out

    def mask_known(self) -> np.ndarray:
        """Whether each slice's mask is ground truth (bool ``[N]``)."""
        out = np.zeros(self.n_slices, dtype=bool)
        for s in self.studies:
            out[s["start"] : s["stop"]] = s["has_mask"]
        return out


def open_cache(path: Path | str, hit: bool = True) -> SiteCache:
    path = Path(path)
    index = json.loads((path / "index.json").read_text())
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: cache format {index.get('format')} is not {CACHE_FORMAT}; rebuild it")
    n, size = index["n_slices"], index["size"]

    def mm(name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        if n == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(path / name, dtype=dtype, mode="r", shape=shape)

    return SiteCache(
        path,
        index,
        mm("images.u8", "uint8", (n, size, size)),
        mm("masks.u8", "uint8", (n, size, size)),
        mm("slice_labels.f4", "float32", (n, len(LABELS))),
        hit,
    )


def _study_entry(record: StudyRecord, secret: bytes, start: int, stop: int, size: int) -> dict:
    g = record.geometry
    labels = label_vector_or_missing(record.labels)
    followup = record.extras.get("followup_study_id", "")
    return {
        "study": pseudonym(secret, "study", f"{record.ref.patient_id}/{record.ref.study_id}"),
        "patient": pseudonym(secret, "patient", record.ref.patient_id),
        "start": start,
        "stop": stop,
        "has_mask": record.mask is not None,
        "labels": [None if np.isnan(v) else float(v) for v in labels],
        "pixel_mm": list(model_pixel_mm(g.pixel_spacing, g.shape[1:], size)),
        "slice_mm": g.slice_spacing,
        "location": record.extras.get("location", ""),
        # labels.csv's optional ``site`` column: which hospital a study of a pooled dataset came from
        # (simulations split by it). No other extra column is kept: they may hold dates or names.
        "group": record.extras.get("site", ""),
        "followup": pseudonym(secret, "study", f"{record.ref.patient_id}/{followup}") if followup else "",
    }


def build_site_cache(
    site_dir: Path | str, cache_root: Path | str, cfg: PreprocessConfig, progress: bool = False
) -> tuple[SiteCache, list[Problem]]:
    """Preprocess a site into ``cache_root`` unless an identical cache exists (then reuse it).

    The site's ``site.toml`` window overrides ``cfg.window``. Returns the cache and the problems
    met while building (empty on a cache hit: run ``check`` for the full report).
    """
    site_dir, cache_root = Path(site_dir), Path(cache_root)
    site = read_site_settings(site_dir)
    cfg = cfg.with_window(site.window)
    key = inputs_key(site_dir, cfg)
    target = cache_root / f"{site.site_id}-{key[:16]}"
    if (target / "index.json").is_file():
        return open_cache(target, hit=True), []
    secret = site_secret(cache_root)
    tmp = cache_root / f".building-{site.site_id}-{key[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    walk = iter_studies(site_dir)
    problems: list[Problem] = list(next(walk))
    studies, patient_ids, n = [], [], 0
    if progress:
        from tqdm import tqdm

        walk = tqdm(walk, desc=f"cache {site.site_id}", unit="study")
    with (
        open(tmp / "images.u8", "wb") as fi,
        open(tmp / "masks.u8", "wb") as fm,
        open(tmp / "slice_labels.f4", "wb") as fl,
    ):
        for record in walk:
            problems.extend(record.problems)
            if not record.usable:
                continue
            out = preprocess_volume(record.volume, record.mask, cfg)
            k = out.slices.shape[0]
            masks = out.masks if out.masks is not None else np.zeros_like(out.slices)
            labels = label_vector_or_missing(record.labels)
            per_slice = slice_labels(labels, out.masks, k, cfg.min_mask_pixels)
            fi.write(np.ascontiguousarray(out.slices, dtype=np.uint8).tobytes())
            fm.write(np.ascontiguousarray(masks, dtype=np.uint8).tobytes())
            fl.write(np.ascontiguousarray(per_slice, dtype=np.float32).tobytes())
            entry = _study_entry(record, secret, n, n + k, cfg.size)
            entry["brain_fraction"] = [round(float(v), 4) for v in out.brain_fraction]
            entry["mask_pixels"] = [int(v) for v in masks.reshape(k, -1).sum(axis=1, dtype=np.int64)]
            studies.append(entry)
            patient_ids.append(record.ref.patient_id)
            n += k
    for entry, order in zip(studies, patient_orders(patient_ids)):
        entry["patient_order"] = order
    index = {
        "format": CACHE_FORMAT,
        "key": key,
        "site_id": site.site_id,
        "preprocess": cfg.to_dict(),
        "labels": list(LABELS),
        "markers": list(MARKERS),
        "size": cfg.size,
        "n_slices": n,
        "n_studies": len(studies),
        "studies": studies,
    }
    (tmp / "index.json").write_text(json.dumps(index))
    if target.exists():  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return open_cache(target, hit=False), problems
