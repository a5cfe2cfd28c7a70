"""Training losses: Dice + BCE for the mask, weighted BCE for the markers (paper formula 2).

Labels are float arrays with ``NaN`` for "not annotated" (docs/design.md §8): such entries
are masked out of the loss, never read as 0. No device is chosen here: tensors stay where
the caller put them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _as_mask_target(target: Tensor, like: Tensor) -> Tensor:
    if target.dim() == like.dim() - 1:
        target = target.unsqueeze(1)
    if target.shape != like.shape:
        raise ValueError(f"mask target shape {tuple(target.shape)} != logits shape {tuple(like.shape)}")
    return target.to(like.dtype)


def dice_loss(mask_logits: Tensor, target: Tensor, smooth: float = 1.0, per_sample: bool = False) -> Tensor:
    """1 - soft Dice over the whole batch (one sum over all pixels of all images).

    Pooling the batch keeps slices without hematoma (most of them) from dominating as
    they would with a per-image Dice; ``smooth`` keeps an all-empty batch finite (loss 0
    when nothing is predicted either). ``per_sample``: the mean of each image's own Dice loss
    instead, what DP-SGD needs (a pooled Dice makes one slice's gradient depend on the others).
    """
    target = _as_mask_target(target, mask_logits)
    prob = torch.sigmoid(mask_logits.float())
    target = target.float()
    dims = tuple(range(1, prob.dim())) if per_sample else tuple(range(prob.dim()))
    inter = (prob * target).sum(dim=dims)
    return (1.0 - (2.0 * inter + smooth) / (prob.sum(dim=dims) + target.sum(dim=dims) + smooth)).mean()


def segmentation_loss(mask_logits: Tensor, target: Tensor, per_sample: bool = False) -> Tensor:
    """Dice loss + pixel-wise BCE: Dice drives overlap, BCE gives well-behaved early gradients.

    ``per_sample``: a mean over the batch of per-image losses (DP-SGD, see ``dice_loss``).
    """
    target = _as_mask_target(target, mask_logits)
    bce = F.binary_cross_entropy_with_logits(mask_logits.float(), target.float())
    return dice_loss(mask_logits, target, per_sample=per_sample) + bce


def pos_weight_from_counts(
    positives: np.ndarray | Tensor | list[float],
    negatives: np.ndarray | Tensor | list[float],
    max_weight: float | None = None,
) -> Tensor:
    """Per-label positive-class weight = negatives / positives (paper formula 2).

    Where a label has no positives, or no negatives, the ratio is undefined or 0 (which
    would silence the positives): the weight is then 1.0, plain BCE. ``max_weight`` caps
    the weight of very rare labels. Sites report counts; the server sums them and calls this
    on the sums, so every site uses the same global weights.
    """
    pos = torch.as_tensor(np.asarray(positives, dtype=np.float64))
    neg = torch.as_tensor(np.asarray(negatives, dtype=np.float64))
    if pos.shape != neg.shape:
        raise ValueError(f"positives {tuple(pos.shape)} and negatives {tuple(neg.shape)} differ in shape")
    if (pos < 0).any() or (neg < 0).any():
        raise ValueError("label counts must be non-negative")
    defined = (pos > 0) & (neg > 0)
    w = torch.where(defined, neg / torch.where(defined, pos, torch.ones_like(pos)), torch.ones_like(pos))
    if max_weight is not None:
        w = w.clamp(max=max_weight)
    return w.float()


def weighted_bce(
    marker_logits: Tensor, labels: Tensor, pos_weight: Tensor | None = None, per_sample: bool = False
) -> Tensor:
    """Weighted binary cross-entropy over the annotated entries only (paper formula 2).

    ``loss[n, c] = -(w_c * y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)))``, averaged over the
    entries whose label is not NaN. NaN entries contribute nothing and get an exactly-zero
    gradient; with no annotated entry at all the loss is 0 (still attached to the graph, so
    ``backward`` works and gives zero gradients). ``per_sample``: the mean over rows of each
    row's average over its own annotated entries (DP-SGD: no slice's gradient depends on how
    many labels the other slices of the batch have).
    """
    if labels.shape != marker_logits.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits shape {tuple(marker_logits.shape)}")
    logits = marker_logits.float()
    labels = labels.to(device=logits.device, dtype=torch.float32)
    annotated = ~torch.isnan(labels)
    if pos_weight is not None:
        pos_weight = pos_weight.to(device=logits.device, dtype=torch.float32)
    per_entry = F.binary_cross_entropy_with_logits(
        logits, torch.where(annotated, labels, torch.zeros_like(labels)), pos_weight=pos_weight, reduction="none"
    )
    kept = torch.where(annotated, per_entry, torch.zeros_like(per_entry))
    if per_sample:
        return (kept.sum(dim=1) / annotated.sum(dim=1).clamp(min=1)).mean()
    return kept.sum() / annotated.sum().clamp(min=1)


def label_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-label (positives, negatives) of an [N, C] 0/1/NaN array; NaN (not annotated) ignored.

    These counts are what a site reports and what ``pos_weight_from_counts`` takes.
    """
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ValueError(f"labels must be [N] or [N, C], got shape {y.shape}")
    known = ~np.isnan(y)
    if not np.isin(y[known], (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN")
    return (y == 1).sum(axis=0).astype(np.int64), (y == 0).sum(axis=0).astype(np.int64)
