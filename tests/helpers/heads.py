"""Phantom head volumes in HU for the preprocessing tests: brain, skull ring, scalp, hematoma disc."""

from __future__ import annotations

import numpy as np

from common.config import AIR_HU

BRAIN_HU, BLOB_HU, SKULL_HU, SCALP_HU = 35.0, 70.0, 1000.0, 40.0


def synthetic_head(
    k: int = 6,
    n: int = 256,
    centre: tuple[float, float] | None = None,
    axes: tuple[float, float] = (95.0, 78.0),
    skull: float = 9.0,
    scalp: float = 7.0,
    blob: tuple[float, float, float] | None = None,
    gap: int = 0,
    gap_slices=(),
    noise: float = 4.0,
    seed: int = 0,
):
    """An HU volume: brain ellipse (35 HU) inside a bone ring (1000 HU) inside a scalp ring (40 HU)
    in air, the ellipse shrinking towards both ends; a 70 HU hematoma disc ``blob = (y, x, radius)``.

    ``gap`` opens the skull ring over that many pixels (filled with scalp) on ``gap_slices``.
    Returns ``hu [k, n, n]`` and bool ``brain`` (the true brain), ``inside`` (inside the skull's
    outer edge), ``blob`` masks of the same shape.
    """
    rng = np.random.default_rng(seed)
    cy, cx = centre if centre is not None else ((n - 1) / 2, (n - 1) / 2)
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    hu = np.full((k, n, n), AIR_HU, dtype=np.float32)
    brain, inside, blob_mask = (np.zeros((k, n, n), dtype=bool) for _ in range(3))
    for i in range(k):
        s = 0.7 + 0.3 * np.sin(np.pi * (i + 1) / (k + 1))
        ay, ax = axes[0] * s, axes[1] * s
        r = np.hypot((yy - cy) / ay, (xx - cx) / ax)
        t_skull, t_scalp = skull / ay, scalp / ay
        brain[i] = r < 1
        inside[i] = r < 1 + t_skull
        scalp_ring = r < 1 + t_skull + t_scalp
        sl = np.where(brain[i], BRAIN_HU, np.where(inside[i], SKULL_HU, np.where(scalp_ring, SCALP_HU, AIR_HU)))
        if gap and i in gap_slices:
            sl[(~brain[i]) & inside[i] & (np.abs(xx - cx) < gap / 2) & (yy < cy)] = SCALP_HU
        if blob is not None:
            blob_mask[i] = np.hypot(yy - blob[0], xx - blob[1]) < blob[2]
            sl[blob_mask[i]] = BLOB_HU
        hu[i] = sl
    hu += rng.normal(0.0, noise, hu.shape).astype(np.float32)
    return hu, brain, inside, blob_mask


def centroid(m: np.ndarray) -> np.ndarray:
    idx = np.argwhere(m)
    return idx[:, -2:].mean(axis=0)
