"""The radiomics baseline: handcrafted hematoma features and a per-marker logistic regression.

The standard anchor of the marker literature is a radiomics model of the hematoma ROI, not a deep
network: intensity, texture and shape features of the segmented hematoma and a linear model per
marker. This module is that model, small enough to be trained federatedly:

- ``study_features``: about 30 features of one study from its windowed slices and a hematoma mask
  (the reference mask at training time, the U-Net's mask at validation and test time). Computed by
  hand from numpy, scipy.ndimage (ring by dilation, Sobel gradients) and scikit-image
  (``regionprops``: perimeter, solidity, eccentricity, extent), because pyradiomics cannot be
  installed on this stack (its 3.1.0 sdist carries inconsistent version metadata, 3.0.1 does not
  build on Python 3.11); every feature here is a few lines one can check by hand.
- ``feature_sums`` / ``standardise``: the features' mean and standard deviation from per-feature
  counts, sums and sums of squares, the only thing about the features that leaves a site.
- ``logistic_step`` / ``predict_logits``: plain gradient descent on the weighted binary
  cross-entropy with an L2 penalty, one weight vector and bias per marker, so that sites can run
  local steps and the server can FedAvg the weights (docs/simulations.md, "The radiomics baseline").

Pure numpy, scipy and scikit-image: the sites, the server and the simulation harness share it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.measure import regionprops

from common.config import MARKERS
from common.metrics import hematoma_volume_ml
from common.study_metrics import temperature_nll_stats
from common.validation import ValidationStats, logit_histograms

#: HU percentiles of the hematoma's pixels.
PERCENTILES: tuple[int, ...] = (5, 10, 25, 50, 75, 90, 95)
#: Shape features of one slice's mask (``slice_shape``), on the largest slice and averaged.
SHAPE_NAMES: tuple[str, ...] = ("area_mm2", "perimeter_mm", "circularity", "solidity", "eccentricity", "extent")

FEATURE_NAMES: tuple[str, ...] = (
    *(f"hu_p{p:02d}" for p in PERCENTILES),
    "hu_mean",
    "hu_std",
    "hu_skewness",
    "dark_fraction",  # pixels > DARK_HU below the hematoma's median: hypodense islands
    "ring_mean",  # the brain in a ring of RING_PX pixels around the hematoma
    "ring_median",
    "ring_p10",
    "ring_p90",
    "contrast_median",  # hematoma median - ring median
    *(f"{name}_largest" for name in SHAPE_NAMES),
    *(f"{name}_mean" for name in SHAPE_NAMES[2:]),
    "gradient_mean",  # Sobel magnitude (HU / mm) inside the eroded mask: the blend sign's internal edge
    "gradient_p90",
    "bimodality",  # hu_p90 - hu_p10
    "vertical_contrast",  # lowest third of rows minus top third (HU): a fluid level's dependent layer
    "gradient_anisotropy",  # mean |d/drow| / mean |d/dcol| inside the eroded mask: a horizontal interface
    "volume_ml",
    "hematoma_slices",
)
N_FEATURES = len(FEATURE_NAMES)
#: Features that are defined for a study without hematoma (the others are NaN there).
DEFINED_WHEN_EMPTY: tuple[str, ...] = ("volume_ml", "hematoma_slices")

DARK_HU = 10.0
RING_PX = 2
#: Added to both mean absolute derivatives of the anisotropy (HU / mm): a flat region reads 1, not 0 / 0.
ANISOTROPY_EPS = 0.5
#: Standardised features are clipped here, so one outlying study cannot dominate a gradient step.
CLIP_SD = 8.0


# --- features ------------------------------------------------------------------------------------


def to_hu(slices_u8: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """The cache's uint8 slices back in HU: 0..255 spans the window [a, b] (``apply_window``'s inverse;
    values clipped at the window's ends stay at its ends)."""
    a, b = float(window[0]), float(window[1])
    return np.asarray(slices_u8, dtype=np.float64) / 255.0 * (b - a) + a


def _skewness(x: np.ndarray) -> float:
    sd = x.std()
    return float(((x - x.mean()) ** 3).mean() / sd**3) if sd > 0 else 0.0


def intensity_features(pixels: np.ndarray) -> list[float]:
    """Percentiles, mean, sd, skewness and the dark-island fraction of the hematoma's HU (all slices pooled)."""
    median = float(np.median(pixels))
    return [
        *np.percentile(pixels, PERCENTILES).tolist(),
        float(pixels.mean()),
        float(pixels.std()),
        _skewness(pixels),
        float(np.mean(pixels < median - DARK_HU)),
    ]


def ring_masks(hu: np.ndarray, masks: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """Per slice, the brain within ``RING_PX`` pixels of the hematoma but outside it: what the
    hematoma's density is compared with (air and the stripped skull, at the window's floor, left out)."""
    out = np.zeros_like(masks)
    for i, m in enumerate(masks):
        out[i] = ndimage.binary_dilation(m, iterations=RING_PX) & ~m & (hu[i] > float(window[0]))
    return out


def ring_features(ring_pixels: np.ndarray, hematoma_median: float) -> list[float]:
    """Mean, median, p10, p90 of the ring's HU and the hematoma-minus-ring median contrast (NaN: no ring)."""
    if not ring_pixels.size:
        return [np.nan] * 5
    median = float(np.median(ring_pixels))
    p10, p90 = np.percentile(ring_pixels, (10, 90))
    return [float(ring_pixels.mean()), median, float(p10), float(p90), hematoma_median - median]


def slice_shape(mask: np.ndarray, pixel_mm: float) -> list[float]:
    """``SHAPE_NAMES`` of one slice's mask, all its components as one region (lobules and satellites
    lower solidity and circularity: the irregular margin). Circularity 4 pi A / P^2 is ~1 for a disk."""
    props = regionprops(mask.astype(np.uint8))[0]
    area, perimeter = float(props.area), float(props.perimeter)
    circularity = 4 * np.pi * area / perimeter**2 if perimeter > 0 else np.nan
    return [
        area * pixel_mm**2,
        perimeter * pixel_mm,
        circularity,
        float(props.solidity),
        float(props.eccentricity),
        float(props.extent),
    ]


def interior(mask: np.ndarray) -> np.ndarray:
    """The mask less its border pixels (3 x 3 erosion): a Sobel window there sees hematoma only, so the
    hematoma's own edge against the brain does not count as internal structure. The mask itself
    where nothing is left."""
    inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool))
    return inner if inner.any() else mask


def sobel(hu: np.ndarray, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """d/drow and d/dcol of one slice in HU / mm (scipy's Sobel is 8 x the derivative per pixel)."""
    return ndimage.sobel(hu, axis=0) / (8 * pixel_mm), ndimage.sobel(hu, axis=1) / (8 * pixel_mm)


def vertical_contrast(hu: np.ndarray, mask: np.ndarray) -> float:
    """Mean HU of the mask's lowest third of rows minus its top third: positive where the denser
    layer lies below (gravity: a larger row index is dependent, docs/design.md §1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    third = (rows[-1] - rows[0] + 1) / 3.0
    r = np.arange(mask.shape[0])[:, None]
    top, bottom = mask & (r < rows[0] + third), mask & (r > rows[-1] - third)
    return float(hu[bottom].mean() - hu[top].mean())


def study_features(
    slices_u8: np.ndarray,
    masks: np.ndarray,
    window: Sequence[float] = (0.0, 80.0),
    pixel_mm: float = 1.0,
    slice_mm: float = 5.0,
    min_pixels: int = 10,
) -> np.ndarray:
    """``FEATURE_NAMES`` of one study from its slices [k, S, S] (uint8, the cache's) and hematoma
    masks [k, S, S] (0/1). Only the slices whose mask has more than ``min_pixels`` pixels count (the
    rule that says which slices hold hematoma); with none, every feature is NaN but the volume and
    the slice count (the training mean stands in for NaN: ``standardised``)."""
    masks = np.asarray(masks) > 0
    hu = to_hu(slices_u8, window)
    volume = hematoma_volume_ml(masks.sum(), pixel_mm, slice_mm)
    keep = masks.reshape(len(masks), -1).sum(axis=1) > min_pixels
    out = np.full(N_FEATURES, np.nan)
    out[FEATURE_NAMES.index("volume_ml")] = volume
    out[FEATURE_NAMES.index("hematoma_slices")] = float(keep.sum())
    if not keep.any():
        return out
    hu, masks = hu[keep], masks[keep]
    pixels = hu[masks]
    values = intensity_features(pixels)
    values += ring_features(hu[ring_masks(hu, masks, window)], float(np.median(pixels)))
    shapes = np.asarray([slice_shape(m, pixel_mm) for m in masks])
    largest = int(np.argmax(masks.reshape(len(masks), -1).sum(axis=1)))
    values += shapes[largest].tolist() + np.nanmean(shapes[:, 2:], axis=0).tolist()
    values += gradient_features(hu, masks, pixel_mm)
    values.append(values[FEATURE_NAMES.index("hu_p90")] - values[FEATURE_NAMES.index("hu_p10")])
    weights = masks.reshape(len(masks), -1).sum(axis=1)
    values.append(float(np.average([vertical_contrast(h, m) for h, m in zip(hu, masks)], weights=weights)))
    values.append(anisotropy(hu, masks, pixel_mm))
    out[: len(values)] = values
    return out


def gradient_features(hu: np.ndarray, masks: np.ndarray, pixel_mm: float) -> list[float]:
    """Mean and p90 of the Sobel gradient magnitude (HU / mm) inside the hematoma's interior."""
    magnitude = [np.hypot(*sobel(h, pixel_mm))[interior(m)] for h, m in zip(hu, masks)]
    pooled = np.concatenate(magnitude)
    return [float(pooled.mean()), float(np.percentile(pooled, 90))]


def anisotropy(hu: np.ndarray, masks: np.ndarray, pixel_mm: float) -> float:
    """(mean |d/drow| + eps) / (mean |d/dcol| + eps) inside the interior: > 1 across a horizontal interface."""
    rows, cols = [], []
    for h, m in zip(hu, masks):
        d_row, d_col = sobel(h, pixel_mm)
        inner = interior(m)
        rows.append(np.abs(d_row[inner]))
        cols.append(np.abs(d_col[inner]))
    return float((np.concatenate(rows).mean() + ANISOTROPY_EPS) / (np.concatenate(cols).mean() + ANISOTROPY_EPS))


# --- standardisation from sums -------------------------------------------------------------------


def feature_sums(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature over the rows of ``X`` [n, F]: (count of non-NaN values, their sum, their sum of
    squares). What a site sends instead of its features; the sums add up over sites."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    known = ~np.isnan(X)
    Z = np.where(known, X, 0.0)
    return known.sum(axis=0).astype(np.float64), Z.sum(axis=0), (Z**2).sum(axis=0)


def standardise(n: np.ndarray, total: np.ndarray, total_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sd) per feature from summed counts, sums and sums of squares (the population sd, as
    ``np.nanstd``). A feature never seen gets mean 0; a constant one sd 1 (it then standardises to 0)."""
    n, total, total_sq = (np.asarray(v, dtype=np.float64) for v in (n, total, total_sq))
    safe = np.maximum(n, 1.0)
    mean = np.where(n > 0, total / safe, 0.0)
    sd = np.sqrt(np.maximum(total_sq / safe - mean**2, 0.0))
    return mean, np.where(sd > 1e-9 * np.maximum(np.abs(mean), 1.0), sd, 1.0)


def standardised(X: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """(X - mean) / sd, clipped to +-``CLIP_SD``; NaN (a feature undefined for a study) becomes 0,
    i.e. the training mean."""
    Z = (np.asarray(X, dtype=np.float64) - mean) / sd
    return np.clip(np.nan_to_num(Z, nan=0.0), -CLIP_SD, CLIP_SD)


# --- the per-marker logistic regression ----------------------------------------------------------


def initial_weights(n_features: int = N_FEATURES, n_markers: int = len(MARKERS)) -> np.ndarray:
    """[M, F + 1] zeros: every marker's weights, its bias last (a probability of 1/2 everywhere)."""
    return np.zeros((n_markers, n_features + 1))


def predict_logits(weights: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Study logits [n, M] of standardised features ``X`` [n, F] under ``weights`` [M, F + 1]."""
    W = np.asarray(weights, dtype=np.float64)
    return np.asarray(X, dtype=np.float64) @ W[:, :-1].T + W[:, -1]


def marker_pos_weight(labels: np.ndarray) -> np.ndarray:
    """negatives / positives per marker column of 0/1/NaN ``labels`` (the paper's formula 2, as the
    deep model's loss); 1 where a class is missing."""
    return pos_weight_of_counts(*label_sums(labels))


def label_sums(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) per column of 0/1/NaN ``labels`` [n, M]; summed over sites by the server."""
    y = np.asarray(labels, dtype=np.float64)
    return (y == 1).sum(axis=0).astype(np.float64), (y == 0).sum(axis=0).astype(np.float64)


def pos_weight_of_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    return np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1.0), 1.0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def weighted_bce(weights: np.ndarray, X: np.ndarray, y: np.ndarray, pos_weight: np.ndarray, l2: float) -> np.ndarray:
    """Per marker: the mean weighted BCE over the annotated rows plus (l2 / 2) |w|^2 (bias unpenalised):
    the objective ``logistic_step`` descends, and scikit-learn's ``LogisticRegression`` with C = 1 / (l2 n)
    and sample weight ``pos_weight`` on the positives."""
    z = predict_logits(weights, X)
    known = ~np.isnan(y)
    t = np.nan_to_num(y)
    loss = pos_weight * t * np.logaddexp(0.0, -z) + (1 - t) * np.logaddexp(0.0, z)
    mean = np.where(known, loss, 0.0).sum(axis=0) / np.maximum(known.sum(axis=0), 1)
    return mean + 0.5 * l2 * (np.asarray(weights)[:, :-1] ** 2).sum(axis=1)


def logistic_step(
    weights: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    pos_weight: np.ndarray,
    lr: float,
    l2: float,
    steps: int,
) -> np.ndarray:
    """``steps`` full-batch gradient steps of ``weighted_bce`` from ``weights`` [M, F + 1] on
    standardised ``X`` [n, F] and labels ``y`` [n, M] (NaN: not annotated, left out of that marker's
    mean). Plain gradient descent, so that a site's local steps from the global weights are FedAvg's
    local update; a site with no annotated study of a marker leaves that marker's weights as they came."""
    W = np.array(weights, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    known = ~np.isnan(np.asarray(y, dtype=np.float64))
    t = np.nan_to_num(np.asarray(y, dtype=np.float64))
    n = known.sum(axis=0)
    pw = np.asarray(pos_weight, dtype=np.float64)
    Xb = np.hstack([X, np.ones((len(X), 1))])
    for _ in range(steps):
        p = _sigmoid(Xb @ W.T)
        # d/dz of -[pw t log p + (1 - t) log(1 - p)]
        g = np.where(known, pw * t * (p - 1) + (1 - t) * p, 0.0) / np.maximum(n, 1)
        grad = g.T @ Xb
        grad[:, :-1] += l2 * W[:, :-1]
        W -= lr * np.where((n > 0)[:, None], grad, 0.0)
    return W


# --- the L2 strength of each marker, chosen on validation ----------------------------------------


def candidate_stats(weights: np.ndarray, X: np.ndarray, labels: np.ndarray) -> ValidationStats:
    """The validation sums (``common.validation``) of K candidate weight sets [K, M, F + 1] on
    standardised ``X``: K x M columns, candidate-major, so that sums of sites add up column by column."""
    W = np.asarray(weights, dtype=np.float64)
    logits = np.concatenate([predict_logits(w, X) for w in W], axis=1)
    y = np.tile(np.asarray(labels, dtype=np.float64).reshape(len(logits), W.shape[1]), (1, len(W)))
    return ValidationStats(temperature_nll_stats(logits, y), *logit_histograms(logits, y))


def choose(stats: ValidationStats, n_candidates: int) -> np.ndarray:
    """Per marker, the candidate (index) with the highest pooled validation AUROC; on ties the
    later one (candidates listed weakest L2 first: the stronger penalty); where no candidate has
    an AUROC (a class missing in validation) the middle one."""
    auc = stats.auroc().reshape(n_candidates, -1)
    out = np.full(auc.shape[1], n_candidates // 2)
    for m in range(auc.shape[1]):
        col = auc[:, m]
        if not np.isnan(col).all():
            best = np.nanmax(col)
            out[m] = int(np.flatnonzero(col >= best - 1e-12).max())
    return out


def chosen_weights(weights: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """[M, F + 1]: marker m's row from candidate ``picks[m]`` of ``weights`` [K, M, F + 1]."""
    W = np.asarray(weights)
    return np.stack([W[k, m] for m, k in enumerate(picks)])


def chosen_stats(stats: ValidationStats, picks: np.ndarray) -> ValidationStats:
    """The candidates' validation sums reduced to the chosen candidate's column of each marker."""
    n_markers = len(picks)
    cols = [int(k) * n_markers + m for m, k in enumerate(picks)]
    return ValidationStats(
        stats.temperature_nll[:, cols],
        stats.pos_hist[:, cols],
        stats.neg_hist[:, cols],
        stats.dice_tp,
        stats.dice_fp,
        stats.dice_fn,
    )


# --- the fitted model as a file ------------------------------------------------------------------

MODEL_FORMAT = "hemexp-radiomics/1"
#: Where a radiomics federation writes its model, in its run folder (beside history.json).
MODEL_FILE = "radiomics.json"


@dataclass(frozen=True)
class RadiomicsModel:
    """A fitted radiomics model: the standardisation, the chosen weights [M, F + 1], each marker's
    L2 strength and the calibration meta chosen on validation (``common.validation.calibration_meta``).
    Aggregates and weights only: nothing of one study."""

    mean: np.ndarray  # [F]
    sd: np.ndarray  # [F]
    weights: np.ndarray  # [M, F + 1]
    l2: dict[str, float]
    meta: dict

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Study logits [n, M] of raw features [n, F]."""
        return predict_logits(self.weights, standardised(features, self.mean, self.sd))

    def save(self, path: Path) -> Path:
        doc = {
            "format": MODEL_FORMAT,
            "features": list(FEATURE_NAMES),
            "markers": list(MARKERS),
            "mean": self.mean.tolist(),
            "sd": self.sd.tolist(),
            "weights": np.asarray(self.weights).tolist(),
            "l2": self.l2,
            "meta": self.meta,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> RadiomicsModel:
        """ValueError naming the file when it is not a model of this feature set."""
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != MODEL_FORMAT or tuple(doc.get("features", ())) != FEATURE_NAMES:
            raise ValueError(f"{path}: not a {MODEL_FORMAT} model of this feature set")
        return cls(np.asarray(doc["mean"]), np.asarray(doc["sd"]), np.asarray(doc["weights"]), doc["l2"], doc["meta"])
