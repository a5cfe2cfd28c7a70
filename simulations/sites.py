"""A dataset for research: a folder of site folders (docs/design.md §4), each turned into its cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

from client.data.cache import SiteCache, build_site_cache, open_cache, site_secret
from client.ingest.dicom import Problem
from client.ingest.layouts import list_site_folders
from common.config import PreprocessConfig
from simulations.parallel import run_jobs


def discover_sites(data_root: Path | str) -> list[Path]:
    """Site folders of ``DATA_ROOT``: subfolders holding ``dicom/`` or CT-ICH's ``ct_scans/`` (hidden
    ones skipped), sorted (``client.ingest.layouts.list_site_folders``)."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder does not exist")
    sites = list_site_folders(root)
    if not sites:
        raise FileNotFoundError(f"{root}: no site folder (a subfolder with dicom/ or ct_scans/) found")
    return sites


def default_cache_root(data_root: Path | str) -> Path:
    return Path(data_root) / ".cache"


def prepare_caches(
    data_root: Path | str,
    cfg: PreprocessConfig,
    cache_root: Path | str | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> tuple[dict[str, SiteCache], list[Problem]]:
    """Build (or reuse) every site's cache; returns caches by site folder name and all problems.

    Sites are built in ``workers`` processes (default: one per core, at most one per site): each
    site is independent, and preprocessing a 1,000-patient benchmark takes minutes on one core."""
    cache_root = Path(cache_root) if cache_root else default_cache_root(data_root)
    sites = discover_sites(data_root)
    workers = min(len(sites), os.cpu_count() or 1) if workers is None else workers
    site_secret(cache_root)  # written once here: workers racing to create it would pseudonymise apart

    def done(i: int, result: tuple[int, list[Problem], float]) -> None:
        if progress and result[2] > 0:
            print(f"  cache {sites[i].name}: {result[0]} studies in {result[2]:.0f} s", flush=True)

    jobs = [(site, cache_root, cfg) for site in sites]
    built = run_jobs(_build_one, jobs, workers, [_n_files(s) for s in sites], done)
    caches = {site.name: open_cache(path, hit=seconds == 0) for site, (_, _, seconds, path) in zip(sites, built)}
    return caches, [p for result in built for p in result[1]]


def _build_one(job: tuple[Path, Path, PreprocessConfig]) -> tuple[int, list[Problem], float, Path]:
    """One site's cache in a worker: (studies, problems, seconds building (0: reused), cache path)."""
    site, cache_root, cfg = job
    t0 = time.perf_counter()
    cache, problems = build_site_cache(site, cache_root, cfg)
    seconds = 0.0 if cache.hit else time.perf_counter() - t0
    return len(cache.studies), problems, seconds, cache.path


def _n_files(site: Path) -> int:
    return sum(1 for _ in site.rglob("*.dcm")) or 1
