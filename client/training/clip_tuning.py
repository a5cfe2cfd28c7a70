"""Choosing DP-SGD's clipping bound C (``privacy.max-grad-norm``) from public data, at no privacy cost.

Per-patient DP-SGD clips each patient's summed per-slice gradient to C (``client.training.privacy``).
C far below the typical norm scales every patient down (a smaller effective learning rate); far
above it, the noise sigma * C is larger than the signal needs. The typical norm is a property of
the model and the task, so it can be read off data that costs no privacy: the run's starting model
(``train.init-checkpoint``, e.g. pretrained on the project's synthetic data) on a public or synthetic
dataset, never on a hospital's patients (their norms would themselves be a release).

The stages differ: stage 1's gradient is the U-Net's, stage 2's the classifier's, with other sizes
and losses, hence a C per stage (``privacy.max-grad-norm-stage2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, default_collate

from client.training.privacy import patient_groups, usable_slices
from client.training.train import stage_loss, trainable_half
from common.model import JointModel, freeze_unet, unfreeze_unet

#: The quantiles reported of the per-patient norms.
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def patient_grad_norms(
    model: JointModel,
    ds: Dataset,
    groups: np.ndarray,
    stage: int,
    pos_weight: Tensor | None = None,
    device: torch.device | str = "cpu",
    chunk: int = 32,
) -> np.ndarray:
    """The L2 norm, over the stage's trained half, of each patient's summed per-slice gradient: what
    ``GroupedDPOptimizer`` clips. ``groups``: each item's patient number (``privacy.patient_groups``);
    ``ds``: the stage's usable slices (``privacy.usable_slices``). The DP losses (``per_sample=True``)
    are means of per-slice losses over the rows that count (stage 1: slices with a mask), so a chunk's
    summed gradient is its mean loss's times that number. Eval mode (no dropout, no drop-connect): the
    norm of the deterministic gradient. A patient's slices go ``chunk`` at a time. The model is left
    in eval mode with the stage's half trainable (``freeze_unet`` in stage 2)."""
    device = torch.device(device)
    groups = np.asarray(groups)
    if groups.size != len(ds):
        raise ValueError(f"{groups.size} patient labels for {len(ds)} slices")
    model.to(device)
    if stage == 2:
        freeze_unet(model)
    else:
        unfreeze_unet(model)
    model.eval()
    params = [p for p in trainable_half(model, stage).parameters() if p.requires_grad]
    norms = []
    for patient in np.unique(groups):
        total = [torch.zeros_like(p) for p in params]
        items = np.flatnonzero(groups == patient)
        for start in range(0, items.size, chunk):
            batch = default_collate([ds[int(i)] for i in items[start : start + chunk]])
            loss = stage_loss(model, batch, stage, pos_weight, device, per_sample=True)
            if loss is None:
                continue
            rows = int(batch["mask_known"].sum()) if stage == 1 else int(batch["image"].shape[0])
            grads = torch.autograd.grad(loss * rows, params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t += g
        norms.append(float(torch.sqrt(sum((t.double() ** 2).sum() for t in total))))
    return np.asarray(norms)


def dataset_norms(
    model: JointModel, ds: Dataset, stage: int, pos_weight: Tensor | None = None, device: torch.device | str = "cpu"
) -> np.ndarray:
    """``patient_grad_norms`` over the slices of ``ds`` (a ``SliceDataset``) that DP-SGD would sample in
    ``stage`` (``usable_slices``), by the cache's patients."""
    idx = np.flatnonzero(usable_slices(ds, stage, model.cfg))
    if not idx.size:
        return np.zeros(0)
    usable = Subset(ds, idx.tolist())
    return patient_grad_norms(model, usable, patient_groups(usable), stage, pos_weight, device)


@dataclass(frozen=True)
class NormSummary:
    """Quantiles of one stage's per-patient gradient norms, and the C they suggest."""

    stage: int
    patients: int
    quantiles: dict[float, float]

    @property
    def recommended(self) -> float:
        """The median: about half the patients are clipped (the quantile adaptive clipping usually aims
        at); it keeps most of the signal without sizing the noise for the largest norms."""
        return self.quantiles[0.5]

    def describe(self) -> str:
        qs = ", ".join(f"p{round(q * 100)} {v:.4g}" for q, v in self.quantiles.items())
        return f"stage {self.stage}: {self.patients} patients; norms {qs}; recommended C {self.recommended:.4g}"


def summarize(norms: np.ndarray, stage: int) -> NormSummary:
    """``NormSummary`` of one stage's per-patient norms (numpy's linear-interpolation quantiles)."""
    norms = np.asarray(norms, dtype=np.float64)
    if not norms.size:
        raise ValueError(f"stage {stage}: no patient with a usable slice, so no gradient norm to summarise")
    return NormSummary(stage, int(norms.size), {q: float(np.quantile(norms, q)) for q in QUANTILES})


def run_config_line(summaries: dict[int, NormSummary]) -> str:
    """The run-config overrides of the recommended bounds (stage 2's key only when stage 2 was measured)."""
    parts = [f"privacy.max-grad-norm={summaries[1].recommended:.3g}"] if 1 in summaries else []
    if 2 in summaries:
        parts.append(f"privacy.max-grad-norm-stage2={summaries[2].recommended:.3g}")
    return " ".join(parts)
