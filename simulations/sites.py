"""A dataset for research: a folder of site folders (docs/design.md §4), each turned into its cache."""

from __future__ import annotations

from pathlib import Path

from client.data.cache import SiteCache, build_site_cache
from client.ingest.dicom import Problem
from client.ingest.layouts import list_site_folders
from common.config import PreprocessConfig


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
    data_root: Path | str, cfg: PreprocessConfig, cache_root: Path | str | None = None, progress: bool = True
) -> tuple[dict[str, SiteCache], list[Problem]]:
    """Build (or reuse) every site's cache; returns caches by site folder name and all problems."""
    cache_root = Path(cache_root) if cache_root else default_cache_root(data_root)
    caches, problems = {}, []
    for site in discover_sites(data_root):
        cache, site_problems = build_site_cache(site, cache_root, cfg, progress=progress)
        caches[site.name] = cache
        problems.extend(site_problems)
    return caches, problems
