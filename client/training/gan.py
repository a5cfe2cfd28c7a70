"""Local training of the conditional SNGAN on a site's hematoma crops, sampling, and augmentation.

The paper's §6 ("Classification of Hematoma Expansion Markers by Deep Learning") adds generated
hypodensity / non-hypodensity images to the classifier's training data. Here a site trains the
GAN on its own crops (``client.data.crops``), and ``augment_with_generated`` mixes generated
samples into a stage-2 training set at a configured ratio (docs/gan.md).

Privacy: generated images are derived from patient images and a GAN can reproduce its training
crops (``common.gan_metrics.memorisation``). They are made and used in-process only: never written
to disk, logged, put in a message or sent to the server. Only their counts may be reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from client.data.crops import HematomaCrops, paste_crop
from client.data.dataset import study_pixel_mm
from common.config import LABELS
from common.gan import Discriminator, GanConfig, Generator, d_hinge_loss, g_hinge_loss


@dataclass(frozen=True)
class GanTrainResult:
    """Mean losses per generator step (the discriminator's averaged over its ``n_dis`` updates)."""

    d_losses: list[float]
    g_losses: list[float]
    steps: int
    seconds: float

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else float("nan")


def make_gan_optimizers(G: Generator, D: Discriminator, cfg: GanConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for each network (Miyato et al. 2018: beta1 = 0, beta2 = 0.9)."""
    return (
        torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=cfg.betas),
        torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=cfg.betas),
    )


def class_weights(labels: Tensor, balanced: bool) -> Tensor:
    """Sampling weight per example: equal per class when ``balanced`` (a rare class is seen as often)."""
    if not balanced:
        return torch.ones(labels.shape[0], dtype=torch.double)
    counts = torch.bincount(labels).double()
    return 1.0 / counts[labels]


def train_gan(
    G: Generator,
    D: Discriminator,
    images: Tensor,
    labels: Tensor,
    cfg: GanConfig,
    steps: int,
    seed: int,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer] | None = None,
) -> GanTrainResult:
    """``steps`` generator updates, each after ``cfg.n_dis`` discriminator updates (hinge loss).

    ``images`` [N, 1, S, S] in [-1, 1] and ``labels`` [N] are a site's crops (``HematomaCrops.tensors``);
    they move to the networks' device. Batches and noise come from a generator seeded by ``seed``,
    so two runs from the same weights give the same losses. Pass ``optimizers`` to keep Adam's
    state across calls (e.g. federated rounds); by default fresh ones are made.
    """
    if images.shape[0] == 0:
        raise ValueError("no crops to train the GAN on")
    device = next(G.parameters()).device
    images, labels = images.to(device), labels.to(device)
    opt_g, opt_d = optimizers or make_gan_optimizers(G, D, cfg)
    g = torch.Generator().manual_seed(seed)
    weights = class_weights(labels.cpu(), cfg.balanced)
    G.train()
    D.train()
    d_losses, g_losses, t0 = [], [], time.perf_counter()
    for _ in range(steps):
        d_step = []
        for _ in range(cfg.n_dis):
            idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=g).to(device)
            x, y = images[idx], labels[idx]
            z = torch.randn(cfg.batch_size, cfg.z_dim, generator=g).to(device)
            with torch.no_grad():
                fake = G(z, y)
            loss_d = d_hinge_loss(D(x, y), D(fake, y))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            d_step.append(float(loss_d.detach()))
        z = torch.randn(cfg.batch_size, cfg.z_dim, generator=g).to(device)
        loss_g = g_hinge_loss(D(G(z, y), y))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        d_losses.append(float(np.mean(d_step)))
        g_losses.append(float(loss_g.detach()))
    return GanTrainResult(d_losses, g_losses, steps, time.perf_counter() - t0)


@torch.no_grad()
def generate(
    G: Generator, labels: int | list[int] | Tensor, n: int, seed: int, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """``n`` images of each class in ``labels``: ``([n * len(labels), 1, S, S] in [-1, 1] on the CPU, classes)``.

    The generator runs in eval mode (batch-norm running statistics), so a sample does not depend
    on what else is in its batch; the same ``seed`` gives the same images. Keep them in-process.
    """
    classes = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).repeat_interleave(n)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(classes.shape[0], G.cfg.z_dim, generator=g)
    device, was_training = next(G.parameters()).device, G.training
    G.eval()
    try:
        out = [G(zb.to(device), yb.to(device)).cpu() for zb, yb in zip(z.split(batch_size), classes.split(batch_size))]
    finally:
        G.train(was_training)
    side = G.cfg.image_size
    return (torch.cat(out) if out else torch.zeros(0, 1, side, side)), classes


class GeneratedSlices(Dataset):
    """Generated crops pasted into real training slices, in ``SliceDataset``'s item format.

    Sample i: a generated crop of class ``classes[i]`` put inside the hematoma mask of a real
    carrier slice (``paste_crop``). Its label row is NaN (not annotated) except the GAN's marker,
    since the pasted interior may have changed the other markers. ``labels``, ``hematoma_pixels``
    and ``study_keys`` match ``SliceDataset``'s, so balanced sampling and pos-weights count
    generated samples too. In-process only (module docstring).
    """

    def __init__(self, carriers: HematomaCrops, images: Tensor, classes: Tensor, seed: int) -> None:
        if len(carriers) == 0 and images.shape[0]:
            raise ValueError("generated samples need at least one carrier slice")
        self.carriers, self.images, self.classes = carriers, images, classes.to(torch.int64)
        rng = np.random.default_rng(seed)
        self.carrier_of = rng.integers(0, max(len(carriers), 1), size=images.shape[0])
        self._labels = np.full((images.shape[0], len(LABELS)), np.nan, dtype=np.float32)
        self._labels[:, LABELS.index(carriers.cfg.marker)] = self.classes.numpy()
        carrier_study = carriers.cache.slice_study()[carriers.slices] if len(carriers) else np.zeros(0, np.int64)
        self._pixel_mm = study_pixel_mm(carriers.cache)[carrier_study][self.carrier_of] if len(carriers) else []

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        c = int(self.carrier_of[i])
        j = int(self.carriers.slices[c])
        mask = np.asarray(self.carriers.cache.masks[j])
        image = paste_crop(np.asarray(self.carriers.cache.images[j]), mask, self.images[i], self.carriers.boxes[c])
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(np.array(mask)),
            "labels": torch.from_numpy(self._labels[i].copy()),
            "mask_known": torch.tensor(True),
            "study": torch.tensor(-1),
            "pixel_mm": torch.tensor(float(self._pixel_mm[i])),
        }

    def labels(self) -> np.ndarray:
        """``[N, len(LABELS)]``: the generated class in the marker's column, NaN elsewhere."""
        return self._labels.copy()

    def hematoma_pixels(self) -> np.ndarray:
        """The carrier slices' hematoma pixels (the mask is the carrier's)."""
        pixels = np.concatenate([np.asarray(s["mask_pixels"]) for s in self.carriers.cache.studies])
        return pixels[self.carriers.slices[self.carrier_of]] if len(self) else np.zeros(0, dtype=np.int64)

    def study_keys(self) -> np.ndarray:
        """One made-up study per sample: generated samples belong to no patient."""
        return np.asarray([f"generated/{i}" for i in range(len(self))])


def class_counts(n: int, positive_fraction: float) -> tuple[int, int]:
    """How many of ``n`` generated samples are negative and positive."""
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    pos = int(round(n * positive_fraction))
    return n - pos, pos


def augment_with_generated(
    real: Dataset, carriers: HematomaCrops, G: Generator, ratio: float, seed: int, positive_fraction: float = 0.5
) -> Dataset:
    """``real`` plus ``round(ratio * len(real))`` generated slices (``GeneratedSlices``).

    ``carriers`` are crops of the same site's *training* slices (never validation or test ones).
    ``positive_fraction`` of the generated samples show the marker: the default 0.5 evens out a
    rare positive class. ``ratio = 0`` returns ``real`` unchanged. A pooled ``real`` (``ConcatDataset``)
    stays flat: the generated part is appended to its parts, so ``dataset.parts_of`` sees every one.
    Deterministic by ``seed``.
    """
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    n = int(round(ratio * len(real)))
    if n == 0:
        return real
    n_neg, n_pos = class_counts(n, positive_fraction)
    neg, y_neg = generate(G, 0, n_neg, seed)
    pos, y_pos = generate(G, 1, n_pos, seed + 1)
    fake = GeneratedSlices(carriers, torch.cat([neg, pos]), torch.cat([y_neg, y_pos]), seed)
    parts = list(real.datasets) if isinstance(real, ConcatDataset) else [real]  # one flat list of site parts
    return ConcatDataset([*parts, fake])
