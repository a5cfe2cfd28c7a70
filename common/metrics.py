"""Evaluation metrics (paper §5): Dice / IoU / F-score for masks, ROC AUC per marker,
slice-to-study aggregation and hematoma volume.

Everything works on numpy arrays (torch tensors are converted), so sites, server and
reports compute the same numbers. Conventions: a mask is binary (bool, or 0/1; floats are
thresholded at 0.5); an empty prediction on an empty target scores 1.0 (nothing to find,
nothing found); a label of NaN means "not annotated" and is left out.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score

from common.config import LABELS


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


def roc_auc_per_marker(y_true: np.ndarray, y_score: np.ndarray, names: Sequence[str] | None = None) -> dict[str, float]:
    """ROC AUC of each label column over its annotated rows (scikit-learn).

    ``y_true`` [N, C] holds 0/1/NaN; NaN rows of a column are left out of that column. A
    column with a single class (or no annotation) has no AUC: NaN. ``names`` default to
    ``LABELS[:C]`` (the markers, then expansion).
    """
    yt = np.asarray(y_true, dtype=np.float64)
    ys = np.asarray(y_score, dtype=np.float64)
    if yt.ndim == 1:
        yt, ys = yt[:, None], ys.reshape(-1, 1)
    if yt.shape != ys.shape:
        raise ValueError(f"y_true shape {yt.shape} != y_score shape {ys.shape}")
    names = tuple(names) if names is not None else LABELS[: yt.shape[1]]
    if len(names) != yt.shape[1]:
        raise ValueError(f"{len(names)} names for {yt.shape[1]} label columns")
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        known = ~np.isnan(yt[:, j])
        y = yt[known, j]
        out[name] = float(roc_auc_score(y, ys[known, j])) if np.unique(y).size == 2 else float("nan")
    return out


def study_scores(
    slice_scores: np.ndarray, study_ids: Sequence[Hashable], how: str = "max", k: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate slice probabilities to one score per study.

    ``how="max"``: a study is as positive as its most positive slice (a marker needs to show
    on one slice only). ``how="mean_top_k"``: mean of the ``k`` highest slice scores (all of
    them if the study has fewer), less sensitive to one noisy slice.

    Returns ``(studies, scores)``: the distinct study ids in sorted order and the matching
    scores, [S] for [N] input or [S, C] for [N, C] input.
    """
    if how not in ("max", "mean_top_k"):
        raise ValueError(f"how must be 'max' or 'mean_top_k', got {how!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = np.asarray(slice_scores, dtype=np.float64)
    ids = np.asarray(study_ids)
    if ids.shape[0] != s.shape[0]:
        raise ValueError(f"{ids.shape[0]} study ids for {s.shape[0]} slice scores")
    studies, inverse = np.unique(ids, return_inverse=True)
    out = np.empty((studies.size,) + s.shape[1:], dtype=np.float64)
    for i in range(studies.size):
        rows = s[inverse == i]
        if how == "max":
            out[i] = rows.max(axis=0)
        else:
            out[i] = np.sort(rows, axis=0)[-min(k, rows.shape[0]) :].mean(axis=0)
    return studies, out


def volume_ml(mask: object, voxel_volume_mm3: float | Iterable[float]) -> float:
    """Hematoma volume in ml: voxel count x voxel volume (mm^3) / 1000.

    ``voxel_volume_mm3`` is the volume of one voxel, or its spacings (e.g. slice spacing and
    PixelSpacing), which are multiplied.
    """
    v = float(np.prod(np.asarray(voxel_volume_mm3, dtype=np.float64)))
    if v <= 0:
        raise ValueError(f"voxel volume must be positive, got {v}")
    return float(_binary(mask).sum()) * v / 1000.0
