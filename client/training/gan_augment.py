"""Stage-2 augmentation by the site's own conditional SNGAN (docs/gan.md, "Augmentation in stage 2").

The GAN is trained on hematoma crops of the *training* split only and samples hypodensity-positive
and -negative crops that are pasted into real training slices (``augment_with_generated``). The
generator stays at the site (its weights in the site's store between rounds, never in a message),
and the generated slices exist in this process only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from client.data.crops import HematomaCrops
from client.data.dataset import SliceDataset, parts_of
from client.training.gan import GanTrainResult, augment_with_generated, generate, train_gan
from common.gan import GanConfig, Generator, build_gan


class NoGanData(ValueError):
    """The training split cannot train a conditional GAN: no usable crop, or one class only."""


@dataclass(frozen=True)
class GanAugment:
    """How much to add (``ratio`` x the real training slices, ``positive_fraction`` of them
    marker-positive) and the GAN that makes it (``cfg`` trained for ``steps`` generator updates)."""

    cfg: GanConfig
    steps: int
    ratio: float
    positive_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.ratio < 0 or self.steps < 1 or not 0 <= self.positive_fraction <= 1:
            raise ValueError(
                f"GAN augmentation needs ratio >= 0, steps >= 1, positive_fraction in [0, 1]; "
                f"got {self.ratio}, {self.steps}, {self.positive_fraction}"
            )


def training_crops(parts: list[SliceDataset], cfg: GanConfig) -> list[HematomaCrops]:
    """Each part's crops of its own (training) slices: the GAN's data and the paste carriers."""
    return [HematomaCrops(p.cache, p.indices, cfg) for p in parts]


def crop_tensors(crops: list[HematomaCrops]) -> tuple[Tensor, Tensor]:
    """All parts' crops as one ``(images, labels)`` pair; ``NoGanData`` when a class is missing."""
    pairs = [c.tensors() for c in crops if len(c)]
    if not pairs:
        raise NoGanData("no hematoma crops with an annotated marker in the training split: no GAN to train")
    images, labels = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if torch.unique(labels).numel() < 2:
        raise NoGanData("the training crops hold one class of the marker only: a conditional GAN needs both")
    return images, labels


def fit_generator(
    crops: list[HematomaCrops],
    aug: GanAugment,
    seed: int,
    device: torch.device | str = "cpu",
    state: Mapping[str, Tensor] | None = None,
) -> tuple[Generator, GanTrainResult | None]:
    """The site's generator: loaded from ``state`` (a later round) or trained on ``crops`` now."""
    G, D = build_gan(aug.cfg, seed)
    if state is not None:
        G.load_state_dict(state)
        return G, None
    images, labels = crop_tensors(crops)
    G, D = G.to(device), D.to(device)
    result = train_gan(G, D, images, labels, aug.cfg, aug.steps, seed)
    return G.cpu(), result


def augment_parts(
    real: Dataset, crops: list[HematomaCrops], G: Generator, aug: GanAugment, seed: int
) -> tuple[Dataset, int]:
    """``real`` with each part's generated slices pasted into that part's own training slices,
    and how many were added (only this count may leave the process)."""
    out: list[Dataset] = []
    added = 0
    for i, (part, carriers) in enumerate(zip(parts_of(real), crops)):
        if not len(carriers):
            out.append(part)
            continue
        mixed = parts_of(augment_with_generated(part, carriers, G, aug.ratio, seed + 7919 * i, aug.positive_fraction))
        added += sum(len(d) for d in mixed[1:])
        out.extend(mixed)
    return (out[0] if len(out) == 1 else ConcatDataset(out)), added


def augmented_training_set(
    real: Dataset,
    aug: GanAugment,
    seed: int,
    device: torch.device | str = "cpu",
    state: Mapping[str, Tensor] | None = None,
) -> tuple[Dataset, Generator, int]:
    """Stage 2's training set: ``real`` plus generated slices; the generator (to keep at the site)
    and the number added. A pooled ``real`` trains one GAN on every part's crops."""
    crops = training_crops(parts_of(real), aug.cfg)
    G, _ = fit_generator(crops, aug, seed, device, state)
    ds, added = augment_parts(real, crops, G, aug, seed)
    return ds, G, added


def gan_quality(
    G: Generator, train: HematomaCrops, held_out: HematomaCrops, model: torch.nn.Module, seed: int = 0
) -> dict[str, float]:
    """The report's GAN figures, computed at the site (two numbers leave it, never a crop).

    As many generated crops as held-out ones (half positive) go to ``quality_figures``.
    """
    real, _ = held_out.tensors()
    train_x, _ = train.tensors()
    if real.shape[0] < 2 or train_x.shape[0] < 1:
        raise ValueError("the GAN's quality needs at least two held-out and one training crop")
    n = real.shape[0]
    fake = torch.cat([generate(G, 0, n - n // 2, seed)[0], generate(G, 1, n // 2, seed + 1)[0]])
    return quality_figures(fake, train_x, real, model, seed)


def quality_figures(
    generated: Tensor, train: Tensor, held_out: Tensor, model: torch.nn.Module, seed: int = 0
) -> dict[str, float]:
    """``frechet``: Fréchet distance between the held-out real crops and the generated ones in the
    features of the project's classifier (``model``, a trained ``JointModel``); ``memorisation``:
    nearest-neighbour distance ratio of the generated crops to training vs held-out crops (about 1:
    no copying; near 0: copies)."""
    from common.gan_metrics import backbone_extractor, frechet_distance_of, memorisation

    return {
        "frechet": frechet_distance_of(backbone_extractor(model), held_out, generated),
        "memorisation": memorisation(generated, train, held_out, seed).ratio,
        "n_held_out": float(held_out.shape[0]),
    }
