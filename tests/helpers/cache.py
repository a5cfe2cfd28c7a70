"""Site caches built in memory from arrays, for tests that need a cache but no DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.data.cache import CACHE_FORMAT, SiteCache
from common.config import LABELS, MARKERS


def study_entry(
    name: str,
    start: int,
    masks: np.ndarray,
    labels: list[float | None],
    *,
    has_mask: bool = True,
    followup: str = "",
    pixel_mm: tuple[float, float] = (1.0, 1.0),
    slice_mm: float = 5.0,
) -> dict:
    """A cache index entry for ``masks`` [k, S, S] starting at slice ``start`` (pseudonyms made up)."""
    k = masks.shape[0]
    return {
        "study": name,
        "patient": f"P-{name}",
        "start": start,
        "stop": start + k,
        "has_mask": has_mask,
        "labels": labels,
        "pixel_mm": list(pixel_mm),
        "slice_mm": slice_mm,
        "location": "",
        "group": "",
        "followup": followup,
        "brain_fraction": [1.0] * k,
        "mask_pixels": [int(v) for v in masks.reshape(k, -1).sum(axis=1)],
    }


def memory_cache(
    images: np.ndarray, masks: np.ndarray, slice_labels: np.ndarray, studies: list[dict], min_mask_pixels: int = 0
) -> SiteCache:
    """A ``SiteCache`` over in-memory arrays (uint8 [N, S, S] images and masks, float32 labels)."""
    index = {
        "format": CACHE_FORMAT,
        "site_id": "site-test",
        "preprocess": {"min_mask_pixels": min_mask_pixels},
        "labels": list(LABELS),
        "markers": list(MARKERS),
        "size": images.shape[-1],
        "n_slices": images.shape[0],
        "n_studies": len(studies),
        "studies": studies,
    }
    return SiteCache(Path("site-test-cache"), index, images, masks, slice_labels.astype(np.float32))


def synthetic_caches(root: Path, size: int = 64) -> list[SiteCache]:
    """Site caches of a generated dataset's sites, kept in ``root/.cache-tests`` so that tests of
    several modules share one build (a second call is a cache hit)."""
    from client.data.cache import build_site_cache
    from common.config import PreprocessConfig

    cfg = PreprocessConfig(size=size)
    return [build_site_cache(site, root / ".cache-tests", cfg)[0] for site in sorted(root.glob("site-*"))]


def hypodensity_cache(hypodensity: list[int]) -> SiteCache:
    """One 2-slice study per hypodensity label, a 10x10 hematoma on slice 0 of each (32 px slices):
    the smallest cache a GAN can take crops of, one class per study."""
    n = len(hypodensity)
    masks = np.zeros((2 * n, 32, 32), np.uint8)
    masks[0::2, 10:20, 10:20] = 1
    images = np.random.default_rng(0).integers(0, 255, masks.shape).astype(np.uint8)
    labels = np.zeros((2 * n, len(LABELS)), np.float32)
    labels[0::2, LABELS.index("hypodensity")] = hypodensity
    studies = [
        study_entry(f"S{i}", 2 * i, masks[2 * i : 2 * i + 2], [h, 0, 0, 0, None]) for i, h in enumerate(hypodensity)
    ]
    return memory_cache(images, masks, labels, studies)
