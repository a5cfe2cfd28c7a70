"""The radiomics baseline's features of a site's studies (``common.radiomics``), from its cache.

Training studies are described on their reference masks (what a radiomics model is fitted on);
validation and test studies on the U-Net's predicted masks, since a clinic has no reference mask
(the deep model's study rule also looks at the slices holding *predicted* hematoma). Each study's
slices are the split's (brain) slices of that study, as ``client.training.evaluate`` scores them.

The feature vectors stay where they are computed: a site sends only their sums
(``common.radiomics.feature_sums``) and the scalar metrics and validation sums of
``radiomics_metrics`` (docs/design.md §5); the simulation harness, which holds every site's data
anyway, pools them in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from client.data.dataset import SliceDataset, parts_of, study_pixel_mm
from common.config import LABELS, MARKERS
from common.metrics import dice_from_counts, fscore_from_counts, hematoma_volume_ml, iou_from_counts
from common.model import JointModel, to_input
from common.radiomics import N_FEATURES, study_features
from common.study_metrics import StudyOutputs, auprc, auroc, brier, ece

#: The cache's label columns of the markers (LABELS order).
MARKER_COLUMNS = [LABELS.index(m) for m in MARKERS]
#: A cache whose index names no window was built with the default one (``common.config.PreprocessConfig``).
DEFAULT_WINDOW = (0.0, 80.0)

#: A study's masks from its slice indices into the cache: the reference, or the U-Net's.
MaskSource = Callable[[SliceDataset, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class StudyFeatures:
    """One row per study: keys that name nobody, labels and features; and, where a predicted mask
    was used and the study has a reference mask, the pixel counts (TP, FP, FN) and volumes that
    give the U-Net's Dice and volume error (NaN elsewhere)."""

    studies: np.ndarray  # [n] str: SliceDataset.study_keys
    patients: np.ndarray  # [n] str: SliceDataset.patient_keys
    sites: np.ndarray  # [n] str: the site id
    labels: np.ndarray  # [n, M] 0/1/NaN, MARKERS order
    features: np.ndarray  # [n, F]
    empty: np.ndarray  # [n] bool: no slice held (predicted) hematoma (the deep rule's "fallback")
    dice_counts: np.ndarray  # [n, 3] TP, FP, FN of the mask used against the reference; NaN: none
    volumes: np.ndarray  # [n, 2] ml of the mask used and of the reference; NaN: no reference
    n_slices: int = 0  # the slices these studies were computed from

    def __len__(self) -> int:
        return len(self.studies)

    def subset(self, rows: np.ndarray) -> StudyFeatures:
        return StudyFeatures(
            *(getattr(self, f.name)[rows] for f in fields(self) if f.name != "n_slices"), n_slices=self.n_slices
        )

    def annotated(self) -> StudyFeatures:
        """The studies with at least one annotated marker (the ones a regression can learn from)."""
        return self.subset(~np.isnan(self.labels).all(axis=1)) if len(self) else self

    def save(self, path: Path) -> None:
        """Kept on the site's own disk between messages (``client.federation.site_radiomics``), never sent."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, **{f.name: np.asarray(getattr(self, f.name)) for f in fields(self)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> StudyFeatures | None:
        """What ``save`` wrote; None where nothing (or features of another feature set) is stored."""
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            loaded = cls(**{f.name: z[f.name] for f in fields(cls)})
        return loaded if loaded.features.shape[1:] == (N_FEATURES,) else None

    @classmethod
    def concat(cls, parts: Sequence[StudyFeatures]) -> StudyFeatures:
        if not parts:
            return empty_features()
        return cls(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls) if f.name != "n_slices"),
            n_slices=int(sum(p.n_slices for p in parts)),
        )


def empty_features() -> StudyFeatures:
    n = np.zeros(0, dtype=str)
    return StudyFeatures(
        n,
        n,
        n,
        np.zeros((0, len(MARKERS))),
        np.zeros((0, N_FEATURES)),
        np.zeros(0, bool),
        np.zeros((0, 3)),
        np.zeros((0, 2)),
    )


def study_rows(ds: SliceDataset) -> Iterator[tuple[str, np.ndarray]]:
    """(study key, the study's cache slice indices in ``ds``) for every study of ``ds``, in key order."""
    keys = ds.study_keys()
    for key in np.unique(keys):
        yield str(key), ds.indices[keys == key]


def reference_masks(ds: SliceDataset, idx: np.ndarray) -> np.ndarray:
    return np.asarray(ds.cache.masks[idx]) > 0


def unet_masks(model: JointModel, device: torch.device | str = "cpu", batch_size: int = 32) -> MaskSource:
    """The U-Net's masks (mask logit > 0) of a study's slices, as ``evaluate`` thresholds them."""
    device = torch.device(device)
    model.to(device).eval()

    @torch.inference_mode()
    def masks(ds: SliceDataset, idx: np.ndarray) -> np.ndarray:
        out = [
            (model.segment(to_input(np.asarray(ds.cache.images[idx[i : i + batch_size]]), device))[:, 0] > 0)
            .cpu()
            .numpy()
            for i in range(0, len(idx), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0,) + ds.cache.images.shape[1:], bool)

    return masks


def site_features(ds: Dataset, masks: MaskSource, training: bool = False) -> StudyFeatures:
    """Features of every study of ``ds`` (a site's split, or several sites' pooled) on ``masks``;
    ``training``: only the studies with a reference mask (the others have no ROI to learn from),
    and no Dice (``masks`` are the reference)."""
    parts = [site_part_features(p, masks, training) for p in parts_of(ds) if len(p)]
    return StudyFeatures.concat(parts)


def site_part_features(ds: SliceDataset, masks: MaskSource, training: bool) -> StudyFeatures:
    cache, pre = ds.cache, ds.cache.index["preprocess"]
    window = tuple(pre.get("window", DEFAULT_WINDOW))
    pixel_mm, study_of, known = study_pixel_mm(cache), cache.slice_study(), cache.mask_known()
    truth, patient_of = ds.study_labels(), dict(zip(ds.study_keys().tolist(), ds.patient_keys().tolist()))
    rows: list[tuple] = []
    n_slices = 0
    for key, idx in study_rows(ds):
        has_reference = bool(known[idx[0]])
        if training and not has_reference:
            continue
        entry = cache.studies[int(study_of[idx[0]])]
        mask = masks(ds, idx)
        x = study_features(
            np.asarray(cache.images[idx]),
            mask,
            window,
            float(pixel_mm[study_of[idx[0]]]),
            float(entry["slice_mm"]),
            ds.min_mask_pixels,
        )
        ref = reference_masks(ds, idx) if has_reference and not training else None
        rows.append(
            (
                key,
                patient_of[key],
                truth[key][MARKER_COLUMNS],
                x,
                _holds_none(mask, ds.min_mask_pixels),
                *_against(mask, ref, entry),
            )
        )
        n_slices += len(idx)
    if not rows:
        return empty_features()
    keys, patients, labels, X, empty, counts, volumes = zip(*rows)
    site = cache.index["site_id"]
    return StudyFeatures(
        np.asarray(keys, dtype=str),
        np.asarray(patients, dtype=str),
        np.asarray([site] * len(rows), dtype=str),
        np.asarray(labels, dtype=np.float64),
        np.asarray(X, dtype=np.float64),
        np.asarray(empty, dtype=bool),
        np.asarray(counts, dtype=np.float64),
        np.asarray(volumes, dtype=np.float64),
        n_slices,
    )


def _holds_none(mask: np.ndarray, min_pixels: int) -> bool:
    return not bool((mask.reshape(len(mask), -1).sum(axis=1) > min_pixels).any())


def _against(mask: np.ndarray, reference: np.ndarray | None, entry: dict) -> tuple[list[float], list[float]]:
    """(TP, FP, FN) and (ml of ``mask``, ml of the reference); NaN without a reference."""
    if reference is None:
        return [np.nan] * 3, [np.nan] * 2
    counts = [int((mask & reference).sum()), int((mask & ~reference).sum()), int((~mask & reference).sum())]
    volumes = [hematoma_volume_ml(m.sum(), entry["pixel_mm"], entry["slice_mm"]) for m in (mask, reference)]
    return [float(c) for c in counts], volumes


def reference_features(ds: Dataset) -> StudyFeatures:
    """Training studies: their reference masks; studies without one are left out."""
    return site_features(ds, reference_masks, training=True)


def predicted_features(
    ds: Dataset, model: JointModel, device: torch.device | str = "cpu", batch_size: int = 32
) -> StudyFeatures:
    """Validation and test studies: the U-Net's masks, every study of the split."""
    return site_features(ds, unet_masks(model, device, batch_size))


# --- scores and metrics --------------------------------------------------------------------------


def study_outputs(sf: StudyFeatures, logits: np.ndarray) -> StudyOutputs:
    """The regression's study logits as the report pools them (``common.study_metrics.StudyOutputs``)."""
    return StudyOutputs(
        tuple(MARKERS),
        np.asarray(sf.studies, dtype=str),
        np.asarray(sf.patients, dtype=str),
        np.asarray(sf.sites, dtype=str),
        np.asarray(sf.labels, dtype=np.float64),
        np.asarray(logits, dtype=np.float64).reshape(len(sf), len(MARKERS)),
        np.asarray(sf.empty, dtype=bool),
    )


def segmentation_metrics(sf: StudyFeatures) -> dict[str, float]:
    """The U-Net's Dice, IoU and F-score (pixels pooled), per-study Dice and volume error of the
    studies with a reference mask, as ``client.training.evaluate`` reports them (NaN without any)."""
    known = ~np.isnan(sf.dice_counts).any(axis=1)
    if not known.any():
        return dict.fromkeys(("dice", "iou", "fscore", "dice_per_study", "volume_mae_ml"), float("nan"))
    c = sf.dice_counts[known]
    tp, fp, fn = c.sum(axis=0)
    return {
        "dice": dice_from_counts(tp, fp, fn),
        "iou": iou_from_counts(tp, fp, fn),
        "fscore": fscore_from_counts(tp, fp, fn),
        "dice_per_study": float(np.mean([dice_from_counts(*row) for row in c])),
        "volume_mae_ml": float(np.mean(np.abs(sf.volumes[known, 0] - sf.volumes[known, 1]))),
    }


def radiomics_metrics(sf: StudyFeatures, logits: np.ndarray) -> dict:
    """The study-level metrics of ``client.training.evaluate.evaluate`` for the regression's logits:
    ``auc_study/<marker>``, ``auprc_study``, ``brier_study``, ``ece_study`` (uncalibrated),
    ``macro_auc_study``, ``n_studies``, ``n_studies_fallback`` (studies without predicted hematoma),
    ``n_slices``, the U-Net's segmentation metrics, and ``arrays`` with the ``StudyOutputs`` and
    Dice counts the report pools (no slice-level outputs: the model scores studies)."""
    outputs = study_outputs(sf, logits)
    probs = outputs.probabilities()
    metrics: dict = {"n_slices": int(sf.n_slices), **segmentation_metrics(sf)}
    for metric, fn in (("auc_study", auroc), ("auprc_study", auprc), ("brier_study", brier), ("ece_study", ece)):
        for c, name in enumerate(MARKERS):
            metrics[f"{metric}/{name}"] = fn(outputs.labels[:, c], probs[:, c])
    aucs = [metrics[f"auc_study/{n}"] for n in MARKERS if not np.isnan(metrics[f"auc_study/{n}"])]
    metrics["macro_auc_study"] = float(np.mean(aucs)) if aucs else float("nan")
    metrics["n_studies"] = len(sf)
    metrics["n_studies_fallback"] = int(sf.empty.sum())
    known = ~np.isnan(sf.dice_counts).any(axis=1)
    none = np.zeros((0, len(MARKERS)))
    metrics["arrays"] = {
        "names": list(MARKERS),
        "slice_labels": none,
        "slice_scores": none,
        "study_labels": outputs.labels,
        "study_scores": probs,
        "studies": outputs,
        "dice_counts": {str(k): tuple(int(v) for v in c) for k, c in zip(sf.studies[known], sf.dice_counts[known])},
    }
    return metrics
