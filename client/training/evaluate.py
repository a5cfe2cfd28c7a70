"""Evaluation of the joint model on held-out slices: segmentation, markers, hematoma volume.

Segmentation: Dice, IoU, F-score over all pixels and per study (paper §5.1). Markers, at study
level (the primary result): scores by the one slice-to-study rule that ``hemexp predict`` uses
(``common.study_metrics.study_scores_from_slices``: the maximum over the few slices holding the
most predicted hematoma), AUROC, AUPRC, Brier and ECE per label, and the study outputs (logits,
labels, patient keys) that the server and the report pool across sites and seeds for intervals.
As in ``hemexp predict``, the classifier runs only on the slices the rule scores
(``rule_slices``): every slice is segmented, then those few are classified (about a third of an
evaluation's time saved at the tiny preset); the other slices' scores are NaN. At slice level:
AUROC over the scored slices whose reference mask holds hematoma. Volume: predicted vs reference
mask volume in ml.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from client.data.dataset import dataset_labels, dataset_patient_keys, dataset_study_keys, parts_of
from client.training.train import output_columns
from common.config import LABELS
from common.metrics import SegmentationCounts
from common.model import JointModel, to_input
from common.study_metrics import (
    StudyOutputs,
    auprc,
    auroc,
    brier,
    ece,
    rule_slices,
    slice_auroc_on_hematoma,
    study_scores_from_slices,
)


@dataclass
class Predictions:
    """Per-slice outputs of a model over a dataset (in dataset order)."""

    scores: np.ndarray  # [N, n_out] sigmoid probabilities
    logits: np.ndarray  # [N, n_out]
    pred_pixels: np.ndarray  # [N] predicted hematoma pixels
    true_pixels: np.ndarray  # [N] reference hematoma pixels (0 where unknown)
    mask_known: np.ndarray  # [N] bool
    seg: SegmentationCounts = field(default_factory=SegmentationCounts)


@torch.inference_mode()
def predict_dataset(
    model: JointModel, ds: Dataset, device: torch.device | str = "cpu", batch_size: int = 32
) -> Predictions:
    """Segment every slice of ``ds``, then classify the slices the study rule scores (NaN elsewhere)."""
    device = torch.device(device)
    model.to(device).eval()
    keys = dataset_study_keys(ds)
    pred_px, true_px, known_all = [], [], []
    seg = SegmentationCounts()
    offset = 0
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        image = to_input(batch["image"], device)
        model.unet.check_input_shape(image)
        mask_logits, _ = model.segment_with_features(image)
        pred = (mask_logits[:, 0] > 0).cpu().numpy()
        true = batch["mask"].numpy().astype(bool)
        known = batch["mask_known"].numpy()
        if known.any():
            seg.update(pred[known], true[known], study_ids=list(keys[offset : offset + len(known)][known]))
        pred_px.append(pred.reshape(len(pred), -1).sum(1))
        true_px.append(np.where(known, true.reshape(len(true), -1).sum(1), 0))
        known_all.append(known)
        offset += len(known)
    pixels = _concat(pred_px, 0)
    chosen = scored_slices(keys, pixels, min_mask_pixels(ds))
    logits_np = np.full((len(pixels), len(model.output_names)), np.nan, dtype=np.float32)
    parts = []
    for batch in DataLoader(Subset(ds, chosen.tolist()), batch_size=batch_size, shuffle=False):
        _, logits = model(to_input(batch["image"], device), pixel_mm=batch["pixel_mm"].to(device))
        parts.append(logits.float().cpu().numpy())
    if parts:
        logits_np[chosen] = np.concatenate(parts)
    return Predictions(
        torch.sigmoid(torch.from_numpy(logits_np)).numpy(),
        logits_np,
        pixels,
        _concat(true_px, 0),
        _concat(known_all, 0).astype(bool),
        seg,
    )


def scored_slices(keys: np.ndarray, predicted_pixels: np.ndarray, min_pixels: np.ndarray) -> np.ndarray:
    """Dataset positions, ascending, of the slices whose scores make their study's score
    (``common.study_metrics.rule_slices`` per study): the only ones the classifier needs to see."""
    out = []
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        out.append(rows[rule_slices(predicted_pixels[rows], min_pixels[rows])])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=int)


def _concat(parts: list[np.ndarray], empty_shape) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape)


def volume_errors(pred: Predictions, keys: np.ndarray, voxel_ml: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per study with a reference mask: (predicted ml, reference ml)."""
    out = {}
    for key in np.unique(keys[pred.mask_known]) if pred.mask_known.any() else []:
        rows = keys == key
        out[str(key)] = (
            float((pred.pred_pixels[rows] * voxel_ml[rows]).sum()),
            float((pred.true_pixels[rows] * voxel_ml[rows]).sum()),
        )
    return out


def min_mask_pixels(ds: Dataset) -> np.ndarray:
    """Per slice, the pixels a mask needs for the slice to hold hematoma (its cache's preprocessing)."""
    parts = parts_of(ds)
    return np.concatenate([np.full(len(p), p.min_mask_pixels) for p in parts]) if parts else np.zeros(0, int)


def study_outputs(pred: Predictions, ds: Dataset, names: list[str], cols: list[int]) -> StudyOutputs:
    """The dataset's studies scored by the one slice-to-study rule, with labels and patient keys."""
    keys = dataset_study_keys(ds)
    combined = study_scores_from_slices(pred.logits, keys, pred.pred_pixels, min_mask_pixels(ds))
    truth, site_of = {}, {}
    for part in parts_of(ds):
        truth.update(part.study_labels())
        site_of.update({str(k): part.cache.index["site_id"] for k in part.study_keys()})
    patient_of = dict(zip(keys.tolist(), dataset_patient_keys(ds).tolist()))
    studies = [str(k) for k in combined.studies]
    n = len(studies)
    return StudyOutputs(
        tuple(names),
        np.asarray(studies, dtype=str),
        np.asarray([patient_of[k] for k in studies], dtype=str),
        np.asarray([site_of[k] for k in studies], dtype=str),
        np.stack([truth[k][cols] for k in studies]).astype(np.float64) if n else np.zeros((0, len(cols))),
        combined.values if n else np.zeros((0, len(cols))),
        combined.fallback,
    )


def evaluate(model: JointModel, ds: Dataset, device: torch.device | str = "cpu", batch_size: int = 32) -> dict:
    """All metrics of one model on one dataset, as a flat dict plus arrays for curves and pooling.

    Keys: ``dice``, ``iou``, ``fscore`` (pixels pooled), ``dice_per_study``; per label
    ``auc_slice/<label>`` (scored slices whose reference mask holds hematoma),
    ``auc_study/<label>``, ``auprc_study/<label>``, ``brier_study/<label>``, ``ece_study/<label>``
    (study scores by the one rule, uncalibrated); ``macro_auc_study`` (markers), ``volume_mae_ml``,
    ``n_slices``, ``n_studies``, ``n_studies_fallback`` (studies without a slice of predicted
    hematoma). ``arrays`` holds slice and study labels and scores, ``studies`` (a
    :class:`~common.study_metrics.StudyOutputs`, what sites and seeds are pooled from) and
    ``dice_counts`` (study key -> TP, FP, FN of the studies with a reference mask).
    """
    pred = predict_dataset(model, ds, device, batch_size)
    names = list(model.output_names)
    cols = output_columns(model)
    slice_y = dataset_labels(ds)[:, cols] if len(ds) else np.zeros((0, len(cols)))
    keys = dataset_study_keys(ds)
    metrics: dict = {"n_slices": int(len(ds))}
    seg = pred.seg.global_scores() if pred.mask_known.any() else {"dice": np.nan, "iou": np.nan, "fscore": np.nan}
    metrics.update({k: float(v) for k, v in seg.items()})
    per_study = pred.seg.per_study_scores() if pred.mask_known.any() else {}
    metrics["dice_per_study"] = float(per_study.get("dice", np.nan))
    holds = pred.mask_known & (pred.true_pixels > min_mask_pixels(ds)) & ~np.isnan(pred.logits).any(axis=1)
    for name, v in slice_auroc_on_hematoma(slice_y, pred.scores, holds, names).items():
        metrics[f"auc_slice/{name}"] = v
    studies = study_outputs(pred, ds, names, cols)
    probs = studies.probabilities()
    for metric, fn in (("auc_study", auroc), ("auprc_study", auprc), ("brier_study", brier), ("ece_study", ece)):
        for c, name in enumerate(names):
            metrics[f"{metric}/{name}"] = fn(studies.labels[:, c], probs[:, c])
    marker_aucs = [metrics[f"auc_study/{n}"] for n in names if n != LABELS[-1]]
    marker_aucs = [v for v in marker_aucs if not np.isnan(v)]
    metrics["macro_auc_study"] = float(np.mean(marker_aucs)) if marker_aucs else float("nan")
    metrics["n_studies"] = len(studies)
    metrics["n_studies_fallback"] = int(studies.fallback.sum())
    voxel_ml = np.concatenate([p.voxel_ml() for p in parts_of(ds)]) if len(ds) else np.zeros(0)
    vols = volume_errors(pred, keys, voxel_ml)
    metrics["volume_mae_ml"] = float(np.mean([abs(p - t) for p, t in vols.values()])) if vols else float("nan")
    metrics["arrays"] = {
        "slice_labels": slice_y,
        "slice_scores": pred.scores,
        "slice_holds_hematoma": holds,
        "study_labels": studies.labels,
        "study_scores": probs,
        "volumes": vols,
        "names": names,
        "studies": studies,
        "dice_counts": {str(k): tuple(v) for k, v in pred.seg.per_study.items()},
    }
    return metrics
