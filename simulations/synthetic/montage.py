"""One picture of the whole dataset: a row per site, a column per marker plus a negative.

Marker tiles are crops around the hematoma on the slice that shows the marker best; the negative
tile is the full slice, so head position, tilt, noise and sharpness differences show too. All
tiles use the same window (0..80 HU), which is how the paper's model sees them. A second picture
(``save_difficulty_montage``) shows per marker its subtlest and most obvious example and a mimic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import AIR_HU, MARKERS

#: Montage columns: each marker, then a study without any marker.
COLUMNS: tuple[str, ...] = MARKERS + ("negative",)


@dataclass(frozen=True)
class Tile:
    """One montage cell: an HU image, its mask, and a caption."""

    image: np.ndarray
    mask: np.ndarray
    caption: str
    purity: int  # 2: the only marker of its study, 1: with others, 0: negative


def make_tile(
    hu: np.ndarray, mask: np.ndarray, k: int, pixel_mm: float, radius_mm: float, caption: str, purity: int, crop: bool
) -> Tile:
    """Cut the tile for slice ``k``; a crop is centred on the mask and padded with air."""
    img, m = hu[k], mask[k]
    if crop and m.any():
        rr, cc = np.nonzero(m)
        r0, c0 = int(round(rr.mean())), int(round(cc.mean()))
        half = int(np.ceil(max(1.8 * radius_mm, 25.0) / pixel_mm))
        pad = ((half, half), (half, half))
        img = np.pad(img, pad, constant_values=AIR_HU)[r0 : r0 + 2 * half + 1, c0 : c0 + 2 * half + 1]
        m = np.pad(m, pad)[r0 : r0 + 2 * half + 1, c0 : c0 + 2 * half + 1]
    return Tile(image=img.astype(np.float32), mask=m.copy(), caption=caption, purity=purity)


def save_montage(
    path: Path,
    tiles: Mapping[str, Mapping[str, Tile]],
    row_labels: Mapping[str, str],
    window: tuple[float, float] = (0.0, 80.0),
) -> None:
    """Write the grid as PNG (matplotlib, Agg backend: works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites: Sequence[str] = list(row_labels)
    fig, axes = plt.subplots(
        len(sites), len(COLUMNS), figsize=(2.0 * len(COLUMNS) + 1.2, 2.0 * len(sites)), squeeze=False
    )
    for i, site in enumerate(sites):
        for j, col in enumerate(COLUMNS):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            t = tiles.get(site, {}).get(col)
            if t is None:
                ax.set_facecolor("black")
                ax.text(0.5, 0.5, "none", color="white", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            else:
                ax.imshow(t.image, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
                if t.mask.any():
                    ax.contour(t.mask.astype(float), levels=[0.5], colors="red", linewidths=0.6)
                ax.set_xlabel(t.caption, fontsize=6)
            if i == 0:
                ax.set_title(col, fontsize=9)
            if j == 0:
                ax.set_ylabel(row_labels[site], fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


#: Difficulty montage: per marker, its subtlest and most obvious example and its strongest mimic.
DIFFICULTY_COLUMNS: tuple[str, ...] = ("subtle", "obvious", "mimic")
#: (marker, column) -> (rank, tile); a lower rank is a better example.
DifficultyTiles = dict[tuple[str, str], tuple[float, Tile]]


def offer_difficulty_tiles(tiles: DifficultyTiles, r, evidence: Mapping[str, float], site_id: str) -> None:
    """Keep the subtlest and the most obvious realised marker (by severity) and the negative whose
    mimics show a reader the most evidence for it."""
    ps, rad = r.grid.pixel_spacing, r.info.get("radius_eq_mm", 10.0)
    for m in MARKERS:
        sev = r.info["severity"][m]
        k = r.info["slices"].get(m, r.info["slices"]["largest"]) if sev > 0 else r.info["slices"]["largest"]
        if sev > 0:
            choices = (
                ("subtle", sev, f"{site_id} severity {sev:.2f}"),
                ("obvious", -sev, f"{site_id} severity {sev:.2f}"),
            )
        elif evidence[m] > 0:
            choices = (("mimic", -evidence[m], f"{site_id} mimic, evidence {evidence[m]:.2f}"),)
        else:
            continue
        for col, rank, cap in choices:
            if (m, col) not in tiles or rank < tiles[(m, col)][0]:
                # A mimic may lie away from the clot (ventricular blood, a second bleed): whole slice.
                tiles[(m, col)] = (rank, make_tile(r.hu, r.mask, k, ps, rad, cap, 0, crop=col != "mimic"))


def save_difficulty_montage(path: Path, per_site: Sequence[DifficultyTiles], window=(0.0, 80.0)) -> None:
    """Rows: markers; columns: subtle, obvious, mimic (best example over all sites)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: DifficultyTiles = {}
    for tiles in per_site:
        for key, (rank, tile) in tiles.items():
            if key not in best or rank < best[key][0]:
                best[key] = (rank, tile)
    fig, axes = plt.subplots(len(MARKERS), len(DIFFICULTY_COLUMNS), figsize=(7.0, 2.3 * len(MARKERS)), squeeze=False)
    for i, m in enumerate(MARKERS):
        for j, col in enumerate(DIFFICULTY_COLUMNS):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            hit = best.get((m, col))
            if hit is None:
                ax.set_facecolor("black")
            else:
                ax.imshow(hit[1].image, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
                if hit[1].mask.any():
                    ax.contour(hit[1].mask.astype(float), levels=[0.5], colors="red", linewidths=0.6)
                ax.set_xlabel(hit[1].caption, fontsize=6)
            if i == 0:
                ax.set_title(col, fontsize=9)
            if j == 0:
                ax.set_ylabel(m, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
