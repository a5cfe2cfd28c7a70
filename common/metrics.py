"""Evaluation metrics (paper §5): Dice / IoU / F-score for masks and the hematoma volume. The
study-level metrics (the one AUROC, the one slice-to-study rule) are ``common.study_metrics``.

Everything works on numpy arrays (torch tensors are converted), so sites, server and
reports compute the same numbers. Conventions: a mask is binary (bool, or 0/1; floats are
thresholded at 0.5); an empty prediction on an empty target scores 1.0 (nothing to find,
nothing found); a label of NaN means "not annotated" and is left out.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np


def _binary(mask: object) -> np.ndarray:
    a = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    return a if a.dtype == bool else a > 0.5


def confusion_counts(pred: object, target: object) -> tuple[int, int, int]:
    """(TP, FP, FN) pixel counts of one binary mask (or any stack of masks, summed)."""
    p, t = _binary(pred), _binary(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} != target shape {t.shape}")
    return int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else float(num / den)


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou_from_counts(tp: float, fp: float, fn: float) -> float:
    return _ratio(tp, tp + fp + fn)


def fscore_from_counts(tp: float, fp: float, fn: float, beta: float = 1.0) -> float:
    """F-beta; with beta = 1 it equals Dice for binary masks (paper: F = 1 - dice loss)."""
    b2 = beta * beta
    return _ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp)


def dice(pred: object, target: object) -> float:
    """Dice coefficient 2|P∩T| / (|P| + |T|); 1.0 when both are empty."""
    return dice_from_counts(*confusion_counts(pred, target))


def iou(pred: object, target: object) -> float:
    """Intersection over union |P∩T| / |P∪T|; 1.0 when both are empty."""
    return iou_from_counts(*confusion_counts(pred, target))


def fscore(pred: object, target: object, beta: float = 1.0) -> float:
    """F-beta score of the mask's pixels; 1.0 when both are empty."""
    return fscore_from_counts(*confusion_counts(pred, target), beta=beta)


def _scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    return {
        "dice": dice_from_counts(tp, fp, fn),
        "iou": iou_from_counts(tp, fp, fn),
        "fscore": fscore_from_counts(tp, fp, fn),
    }


@dataclass
class SegmentationCounts:
    """Accumulates TP/FP/FN over a dataset, batch by batch, globally and per study.

    ``global_scores`` pools every pixel of the dataset (one Dice for everything);
    ``per_study_scores`` computes one 3-D Dice per study (all its slices pooled) and
    averages those over studies, so big hematomas do not outweigh small ones.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    per_study: dict[Hashable, list[int]] = field(default_factory=dict)

    def update(self, pred: object, target: object, study_ids: Sequence[Hashable] | None = None) -> None:
        """Add a batch of masks [B, ...]; ``study_ids`` (one per mask) enables per-study scores."""
        p, t = _binary(pred), _binary(target)
        if p.shape != t.shape:
            raise ValueError(f"prediction shape {p.shape} != target shape {t.shape}")
        axes = tuple(range(1, p.ndim))
        tps, fps, fns = ((p & t).sum(axis=axes), (p & ~t).sum(axis=axes), (~p & t).sum(axis=axes))
        self.tp, self.fp, self.fn = self.tp + int(tps.sum()), self.fp + int(fps.sum()), self.fn + int(fns.sum())
        if study_ids is None:
            return
        if len(study_ids) != p.shape[0]:
            raise ValueError(f"{len(study_ids)} study ids for a batch of {p.shape[0]} masks")
        for sid, a, b, c in zip(study_ids, tps, fps, fns):
            acc = self.per_study.setdefault(sid, [0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + int(a), acc[1] + int(b), acc[2] + int(c)

    def global_scores(self) -> dict[str, float]:
        """Dice, IoU, F-score of all pixels pooled."""
        return _scores(self.tp, self.fp, self.fn)

    def per_study_scores(self) -> dict[str, float]:
        """Mean over studies of each study's Dice, IoU, F-score (NaN if no study ids were given)."""
        if not self.per_study:
            return {"dice": float("nan"), "iou": float("nan"), "fscore": float("nan")}
        each = [_scores(*c) for c in self.per_study.values()]
        return {k: float(np.mean([s[k] for s in each])) for k in each[0]}


def hematoma_volume_ml(voxels: float, pixel_mm: float | Sequence[float], slice_mm: float) -> float:
    """THE hematoma volume in ml: ``voxels`` (a count) x the pixel area x ``slice_mm`` / 1000.

    ``slice_mm`` is the spacing between slices measured from their positions (the cache's
    ``slice_mm``, ``client.ingest.dicom.Geometry.slice_spacing``), never the header's SliceThickness:
    a reconstruction's slices can overlap (thickness > spacing) or leave gaps (thickness < spacing),
    and each voxel stands for one spacing of tissue, so the thickness would over- or under-count.
    ``pixel_mm`` is (row, column) spacing, or one number for square pixels. The census, the derived
    expansion label, evaluation, radiomics, ``hemexp check`` and ``predict`` all count with this.
    """
    px = np.broadcast_to(np.asarray(pixel_mm, dtype=np.float64), (2,))
    if not (px > 0).all() or not slice_mm > 0:
        raise ValueError(f"pixel spacing {tuple(px)} and slice spacing {slice_mm} must be positive")
    return float(voxels) * (float(px[0]) * float(px[1]) * float(slice_mm) / 1000.0)
