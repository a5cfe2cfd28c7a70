"""How good and how private generated images are: Fréchet distance, memorisation, a picture grid.

- Fréchet distance between two feature sets, each summarised as a Gaussian (the FID formula).
  The features come from any callable; ``backbone_extractor`` uses the project's own classifier
  (its Wavelet VGG16), since an ImageNet Inception network knows nothing of head CT.
- Memorisation: a GAN that copies its training crops puts its samples nearer to those crops than
  to held-out crops of the same site. ``memorisation`` compares the two nearest-neighbour
  distances; a ratio near 1 means no copying, well below 1 means copies.
- ``save_grid``: generated samples beside real crops, one row per class (the paper's Figures
  5-6 of "Classification of Hematoma Expansion Markers by Deep Learning", §6). The real crops
  are patient images: the PNG stays at the site (docs/gan.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import Tensor

#: A feature extractor: images [B, 1, S, S] in [-1, 1] -> features [B, F].
Extractor = Callable[[Tensor], Tensor]


def _as_2d(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    return x[:, None] if x.ndim == 1 else x.reshape(x.shape[0], -1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` of two feature sets [N, F] (or [N]).

    Means and (unbiased) covariances per set; the matrix square root is ``scipy.linalg.sqrtm``,
    whose tiny imaginary part from rounding is dropped.
    """
    a, b = _as_2d(a), _as_2d(b)
    if a.shape[0] < 2 or b.shape[0] < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need >= 2 samples per set with equal feature sizes, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: regularise as the FID reference code does
        eps = 1e-6 * np.eye(cov_a.shape[0])
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    trace = np.trace(cov_a) + np.trace(cov_b) - 2.0 * float(np.trace(np.real(root)))
    return float(max(np.sum((mu_a - mu_b) ** 2) + trace, 0.0))


@torch.no_grad()
def extract_features(extract: Extractor, images: Tensor, batch_size: int = 64) -> np.ndarray:
    """``extract`` applied batch by batch: features [N, F] as float64 numpy."""
    out = [extract(b).reshape(b.shape[0], -1).double().cpu() for b in images.split(batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def frechet_distance_of(extract: Extractor, real: Tensor, generated: Tensor, batch_size: int = 64) -> float:
    """Fréchet distance between real and generated images in ``extract``'s feature space."""
    return frechet_distance(
        extract_features(extract, real, batch_size), extract_features(extract, generated, batch_size)
    )


def backbone_extractor(model: torch.nn.Module) -> Extractor:
    """Features of the project's classifier: crops resized to the model's input, through the Wavelet VGG16.

    ``model`` is a ``common.model.JointModel``; its classifier's backbone sees images in [0, 1]
    at its input size (the ROI's or the slice's). The ROI classifier's mask channel is all hematoma:
    the GAN's crops are cut inside the hematoma. The model is put in eval mode.
    """
    model.eval()
    cfg, device = model.cfg, next(model.parameters()).device
    size = cfg.roi_size if cfg.classifier_input == "roi" else cfg.image_size

    def extract(images: Tensor) -> Tensor:
        x = F.interpolate((images.float() + 1.0) / 2.0, size=(size, size), mode="bilinear", align_corners=False)
        if cfg.classifier_channels > x.shape[1]:
            x = torch.cat([x, torch.ones_like(x)], dim=1)
        return model.classifier.backbone(x.to(device))

    return extract


def nearest_distances(queries: Tensor, references: Tensor, chunk: int = 512) -> np.ndarray:
    """Euclidean distance from each query to its nearest reference (images flattened)."""
    q, r = queries.reshape(queries.shape[0], -1).double(), references.reshape(references.shape[0], -1).double()
    return torch.cat([torch.cdist(part, r).min(dim=1).values for part in q.split(chunk)]).numpy()


@dataclass(frozen=True)
class Memorisation:
    """Median nearest-neighbour distances of generated samples to training and held-out crops.

    ``ratio = to_train / to_held_out``: about 1 when the generator learnt the distribution, below
    1 when its samples sit on training crops (copies), the more so the smaller.
    """

    to_train: float
    to_held_out: float
    n_generated: int
    n_reference: int

    @property
    def ratio(self) -> float:
        return self.to_train / self.to_held_out if self.to_held_out > 0 else float("nan")


def memorisation(generated: Tensor, train: Tensor, held_out: Tensor, seed: int = 0) -> Memorisation:
    """Compare nearest-neighbour distances of ``generated`` to ``train`` and to ``held_out``.

    A nearest neighbour is closer in a larger set, so the larger reference set is first cut to
    the smaller one's size (a random subset fixed by ``seed``): the ratio then measures copying,
    not set sizes.
    """
    n = min(train.shape[0], held_out.shape[0])
    if n == 0 or generated.shape[0] == 0:
        raise ValueError("memorisation needs generated, training and held-out samples")
    g = torch.Generator().manual_seed(seed)
    train = train[torch.randperm(train.shape[0], generator=g)[:n]]
    held_out = held_out[torch.randperm(held_out.shape[0], generator=g)[:n]]
    return Memorisation(
        float(np.median(nearest_distances(generated, train))),
        float(np.median(nearest_distances(generated, held_out))),
        int(generated.shape[0]),
        n,
    )


def save_grid(
    path: Path | str,
    generated: Mapping[int, Tensor],
    real: Mapping[int, Tensor],
    class_names: Sequence[str],
    n_columns: int = 8,
) -> Path:
    """A PNG: one row per class, ``n_columns`` generated samples, then as many real crops.

    ``generated[c]`` and ``real[c]`` are images [N, 1, S, S] in [-1, 1] of class ``c``; a row with
    fewer images leaves blanks. Real crops are patient images: keep the file at the site.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(set(generated) | set(real))
    fig, axes = plt.subplots(
        len(classes), 2 * n_columns, figsize=(2 * n_columns * 0.9, len(classes) * 1.0 + 0.4), squeeze=False
    )
    for row, c in enumerate(classes):
        shown = [("generated", generated.get(c)), ("real", real.get(c))]
        for block, (kind, images) in enumerate(shown):
            for k in range(n_columns):
                ax = axes[row, block * n_columns + k]
                ax.set_axis_off()
                if images is not None and k < images.shape[0]:
                    ax.imshow(images[k].reshape(images.shape[-2:]).cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
                if row == 0 and k == 0:
                    ax.set_title(kind, fontsize=8, loc="left")
        axes[row, 0].text(
            -0.1, 0.5, class_names[c], transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=8
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
