"""The report's GAN section (docs/gan.md, "Quality figures"), for every method with
``gan.augment-ratio`` > 0: per site (federated and local: the site's own generator; with a federated
GAN stage: the final global one, at every site; pooled: the one generator) the Fréchet distance
between generated crops and the site's held-out real crops in the trained classifier's backbone
features, and the memorisation ratio (median nearest-neighbour
distance of generated crops to training crops over the one to held-out crops; about 1: no
copying); the mean over sites with its spread per seed; and one picture grid per scenario (the
paper's Figures 5-6).

``measure`` and ``draw_grid`` run in the simulation's process after a method's run (the runner
holds every site's data): a deployed site computes the same two numbers with
``client.training.gan_augment.gan_quality`` and keeps its crops and its generator. At most
``limit`` crops of each set enter (a random subset), so the section stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from client.data.dataset import parts_of
from client.training.gan import generate
from client.training.gan_augment import quality_figures, training_crops
from common.gan import GanConfig, Generator
from common.gan_metrics import save_grid
from simulations.report.files import json_safe
from simulations.report.sections import Figure, Paragraph, Section, Table
from simulations.report.tables import fmt, mean_sd

#: Crops of each set (training, held-out) that enter a site's figures by default.
DEFAULT_LIMIT = 256
#: Images per class and kind in the picture grid.
GRID_COLUMNS = 8


def crops_of(datasets: Sequence[Dataset], cfg: GanConfig, limit: int, seed: int) -> tuple[Tensor, Tensor]:
    """The hematoma crops (and marker labels) of every dataset's slices, at most ``limit`` of them
    (a random subset fixed by ``seed``)."""
    parts = [p for d in datasets if len(d) for p in parts_of(d)]
    pairs = [c.tensors() for c in training_crops(parts, cfg) if len(c)]
    if not pairs:
        side = cfg.image_size
        return torch.zeros(0, 1, side, side), torch.zeros(0, dtype=torch.int64)
    images, labels = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if images.shape[0] > limit:
        keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
        images, labels = images[keep], labels[keep]
    return images, labels


def measure(
    G: Generator,
    model: torch.nn.Module,
    train: Sequence[Dataset],
    held_out: Sequence[Dataset],
    cfg: GanConfig,
    limit: int = DEFAULT_LIMIT,
    seed: int = 0,
) -> dict[str, float] | None:
    """One generator's figures: as many generated crops as held-out ones (half positive) against
    the held-out and training crops; None with fewer than two held-out crops or no training crop."""
    train_x, _ = crops_of(train, cfg, limit, seed)
    real, _ = crops_of(held_out, cfg, limit, seed + 1)
    n = real.shape[0]
    if n < 2 or not train_x.shape[0]:
        return None
    fake = torch.cat([generate(G, 0, n - n // 2, seed)[0], generate(G, 1, n // 2, seed + 1)[0]])
    return {**quality_figures(fake, train_x, real, model, seed), "n_train": float(train_x.shape[0])}


def draw_grid(path: Path, G: Generator, held_out: Sequence[Dataset], cfg: GanConfig, seed: int = 0) -> Path | None:
    """The paper's Figures 5-6: a row per class of the GAN's marker, generated crops then held-out
    real ones; None without a held-out crop."""
    real, labels = crops_of(held_out, cfg, 4 * DEFAULT_LIMIT, seed)
    if not real.shape[0]:
        return None
    generated = {c: generate(G, c, GRID_COLUMNS, seed + c)[0] for c in (0, 1)}
    shown = {c: real[labels == c][:GRID_COLUMNS] for c in (0, 1)}
    return save_grid(path, generated, shown, [f"{cfg.marker}-negative", f"{cfg.marker}-positive"], GRID_COLUMNS)


def per_seed(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """Per scenario, method and seed: the mean and standard deviation over sites of each figure."""
    out = []
    for key in dict.fromkeys((r["scenario"], r["method"], r["seed"]) for r in rows):
        mine = [r for r in rows if (r["scenario"], r["method"], r["seed"]) == key]
        row: dict[str, Any] = dict(zip(("scenario", "method", "seed"), key), sites=len(mine))
        for figure in ("frechet", "memorisation", "n_held_out"):
            row[figure], row[f"{figure}_sd"], _ = mean_sd(r[figure] for r in mine)
        out.append(row)
    return out


NOTE = (
    "Per site (federated and local methods: the site's own generator; pooled: the one generator), the "
    "Fréchet distance between generated crops and the site's held-out real crops (validation and test "
    "patients) in the trained classifier's backbone features (lower: closer to real), and the "
    "memorisation ratio: median nearest-neighbour distance of generated crops to training crops over "
    "the one to held-out crops (about 1: no copying; near 0: copies). Mean ± standard deviation over sites."
)
GRID_NOTE = (
    "This picture grid exists only because the simulation holds every site's (synthetic) data in one "
    "process. In a deployment generated and real crops stay at the site, and only the two numbers "
    "above could leave it (docs/gan.md)."
)


def gan_section(rows: Sequence[dict], grids: Mapping[str, Mapping[str, Any]]) -> Section | None:
    """The table per seed and the grids; None when no method trained a GAN."""
    if not rows:
        return None
    table = Table(
        ["scenario", "method", "seed", "sites", "Fréchet distance", "memorisation ratio", "held-out crops per site"],
        [
            [
                r["scenario"],
                r["method"],
                r["seed"],
                r["sites"],
                fmt(r["frechet"], r["frechet_sd"]),
                fmt(r["memorisation"], r["memorisation_sd"]),
                f"{r['n_held_out']:.0f}",
            ]
            for r in per_seed(rows)
        ],
    )
    blocks: list = [Paragraph(NOTE), table]
    for scenario, grid in grids.items():
        caption = f"{scenario}: {grid['method']}, seed {grid['seed']}, {grid['site']}: generated, then real crops"
        blocks += [Figure(Path(grid["path"]), caption)]
    if grids:
        blocks.append(Paragraph(GRID_NOTE, note=True))
    return Section("SNGAN augmentation: sample quality and memorisation", blocks)


def write_gan(out_dir: Path, rows: Sequence[dict], grids: Mapping[str, Mapping[str, Any]]) -> Section | None:
    """``gan_quality.json`` (per site and per seed) when a method trained a GAN, and the report's section."""
    if not rows:
        return None
    drawn = {scenario: {**g, "path": Path(g["path"]).name} for scenario, g in grids.items()}
    doc = {"note": NOTE, "sites": list(rows), "per_seed": per_seed(rows), "grids": drawn}
    (out_dir / "gan_quality.json").write_text(json.dumps(json_safe(doc), indent=1))
    return gan_section(rows, grids)
