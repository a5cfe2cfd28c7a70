"""Evaluation of the joint model on held-out slices: segmentation, markers, hematoma volume.

Segmentation: Dice, IoU, F-score over all pixels and per study (paper §5.1). Markers: ROC AUC per
marker at slice level and at study level, a study being as positive as its most positive slice
(``common.metrics.study_scores(how="max")``). Volume: predicted vs reference mask volume in ml.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from client.data.dataset import dataset_labels, dataset_study_keys, parts_of
from client.training.train import output_columns
from common.config import LABELS
from common.metrics import SegmentationCounts, roc_auc_per_marker, study_scores
from common.model import JointModel, to_input


@dataclass
class Predictions:
    """Per-slice outputs of a model over a dataset (in dataset order)."""

    scores: np.ndarray  # [N, n_out] sigmoid probabilities
    pred_pixels: np.ndarray  # [N] predicted hematoma pixels
    true_pixels: np.ndarray  # [N] reference hematoma pixels (0 where unknown)
    mask_known: np.ndarray  # [N] bool
    seg: SegmentationCounts = field(default_factory=SegmentationCounts)


@torch.inference_mode()
def predict_dataset(
    model: JointModel, ds: Dataset, device: torch.device | str = "cpu", batch_size: int = 32
) -> Predictions:
    device = torch.device(device)
    model.to(device).eval()
    keys = dataset_study_keys(ds)
    scores, pred_px, true_px, known_all = [], [], [], []
    seg = SegmentationCounts()
    offset = 0
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        image = to_input(batch["image"], device)
        mask_logits, logits = model(image)
        pred = (mask_logits[:, 0] > 0).cpu().numpy()
        true = batch["mask"].numpy().astype(bool)
        known = batch["mask_known"].numpy()
        if known.any():
            seg.update(pred[known], true[known], study_ids=list(keys[offset : offset + len(known)][known]))
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        pred_px.append(pred.reshape(len(pred), -1).sum(1))
        true_px.append(np.where(known, true.reshape(len(true), -1).sum(1), 0))
        known_all.append(known)
        offset += len(known)
    n_out = len(model.output_names)
    return Predictions(
        _concat(scores, (0, n_out)), _concat(pred_px, 0), _concat(true_px, 0), _concat(known_all, 0).astype(bool), seg
    )


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


def evaluate(model: JointModel, ds: Dataset, device: torch.device | str = "cpu", batch_size: int = 32) -> dict:
    """All metrics of one model on one dataset, as a flat dict plus arrays for ROC curves.

    Keys: ``dice``, ``iou``, ``fscore`` (pixels pooled), ``dice_per_study``,
    ``auc_slice/<label>``, ``auc_study/<label>``, ``macro_auc_study``, ``volume_mae_ml``,
    ``n_slices``, ``n_studies``; ``arrays`` holds the slice and study labels and scores.
    """
    pred = predict_dataset(model, ds, device, batch_size)
    names = model.output_names
    cols = output_columns(model)
    slice_y = dataset_labels(ds)[:, cols] if len(ds) else np.zeros((0, len(cols)))
    keys = dataset_study_keys(ds)
    metrics: dict = {"n_slices": int(len(ds))}
    seg = pred.seg.global_scores() if pred.mask_known.any() else {"dice": np.nan, "iou": np.nan, "fscore": np.nan}
    metrics.update({k: float(v) for k, v in seg.items()})
    per_study = pred.seg.per_study_scores() if pred.mask_known.any() else {}
    metrics["dice_per_study"] = float(per_study.get("dice", np.nan))
    for name, v in roc_auc_per_marker(slice_y, pred.scores, names).items():
        metrics[f"auc_slice/{name}"] = v
    study_truth = {}
    for part in parts_of(ds):
        study_truth.update(part.study_labels())
    studies, s_scores = study_scores(pred.scores, keys) if len(ds) else (np.zeros(0), np.zeros((0, len(cols))))
    study_y = np.stack([study_truth[str(k)][cols] for k in studies]) if len(studies) else np.zeros((0, len(cols)))
    aucs = roc_auc_per_marker(study_y, s_scores, names)
    for name, v in aucs.items():
        metrics[f"auc_study/{name}"] = v
    marker_aucs = [v for n, v in aucs.items() if n != LABELS[-1] and not np.isnan(v)]
    metrics["macro_auc_study"] = float(np.mean(marker_aucs)) if marker_aucs else float("nan")
    metrics["n_studies"] = int(len(studies))
    voxel_ml = np.concatenate([p.voxel_ml() for p in parts_of(ds)]) if len(ds) else np.zeros(0)
    vols = volume_errors(pred, keys, voxel_ml)
    metrics["volume_mae_ml"] = float(np.mean([abs(p - t) for p, t in vols.values()])) if vols else float("nan")
    metrics["arrays"] = {
        "slice_labels": slice_y,
        "slice_scores": pred.scores,
        "study_labels": study_y,
        "study_scores": s_scores,
        "volumes": vols,
        "names": list(names),
    }
    return metrics
