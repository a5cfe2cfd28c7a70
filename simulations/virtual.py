"""Virtual sites as ordinary site caches, and the partition manifest the ClientApp reads.

A plan that is one whole source cache without shift is used in place (nothing copied); any other
plan is written once as a new cache (same files and index as ``client.data.cache``, the source studies'
pseudonyms kept, slices degraded by the plan's scanner shift) under ``<root>/<site>-<digest>/``
and reused by every method and seed of the experiment.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from client.data.cache import CACHE_FORMAT, SiteCache, open_cache
from client.simulation.partitions import Partition, write_partitions
from simulations.splits import SitePlan, degrade


def _is_whole_source(plan: SitePlan, sources: Sequence[SiteCache]) -> int | None:
    src = {s for s, _ in plan.studies}
    if len(src) != 1 or not plan.shift.is_identity:
        return None
    s = next(iter(src))
    return s if sorted(i for _, i in plan.studies) == list(range(len(sources[s].studies))) else None


def plan_cache(plan: SitePlan, sources: Sequence[SiteCache], root: Path) -> SiteCache:
    """The cache of one plan: the source itself, or a written (or reused) virtual cache."""
    whole = _is_whole_source(plan, sources)
    if whole is not None:
        return sources[whole]
    target = Path(root) / f"{plan.site_id}-{plan.digest(sources)}"
    if (target / "index.json").is_file():
        return open_cache(target)
    tmp = target.with_name(f".building-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    first = sources[plan.studies[0][0]].index
    studies, n = [], 0
    with (
        open(tmp / "images.u8", "wb") as fi,
        open(tmp / "masks.u8", "wb") as fm,
        open(tmp / "slice_labels.f4", "wb") as fl,
    ):
        for k, (s, i) in enumerate(plan.studies):
            cache = sources[s]
            entry = cache.studies[i]
            rows = slice(entry["start"], entry["stop"])
            window = tuple(cache.index["preprocess"]["window"])
            fi.write(
                np.ascontiguousarray(degrade(np.asarray(cache.images[rows]), plan.shift, window, seed=k)).tobytes()
            )
            fm.write(np.ascontiguousarray(cache.masks[rows]).tobytes())
            fl.write(np.ascontiguousarray(cache.slice_labels[rows]).tobytes())
            m = entry["stop"] - entry["start"]
            studies.append({**entry, "start": n, "stop": n + m, "source": cache.index["site_id"]})
            n += m
    index = {
        **{k: first[k] for k in ("preprocess", "labels", "markers", "size")},
        "format": CACHE_FORMAT,
        "key": plan.digest(sources),
        "site_id": plan.site_id,
        "n_slices": n,
        "n_studies": len(studies),
        "studies": studies,
        "shift": plan.shift.__dict__,
    }
    (tmp / "index.json").write_text(json.dumps(index))
    if target.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return open_cache(target)


def write_manifest(path: Path, plans: Sequence[SitePlan], caches: Sequence[SiteCache]) -> Path:
    """The partition manifest of one federated run: node ``partition-id`` i = ``plans[i]``."""
    return write_partitions(
        path, [Partition(p.site_id, str(c.path.resolve()), dict(p.fault)) for p, c in zip(plans, caches)]
    )
