"""Study-level results a paper can quote: one slice-to-study rule, per-marker metrics, patient-level
bootstrap intervals, paired method differences, operating thresholds and temperature scaling.

Pure numpy (scikit-learn only in tests), so sites, server, report and ``hemexp predict`` compute
the same numbers. Conventions:

- A study's score for a marker is the maximum over the ``STUDY_SLICES`` (3) slices that hold the most
  predicted hematoma, or over all its (brain) slices when none holds any (``study_scores_from_slices``,
  ``rule_slices``). The maximum is taken on logits or on probabilities alike (the sigmoid is monotone).
- Labels are 0 / 1 / NaN; NaN (not annotated) rows are left out of that marker's metrics.
- A study is called positive when its probability is ``>= threshold``.
- ECE uses ``ECE_BINS`` equal-width probability bins, each weighted by its share of the studies.
- Intervals are percentile bootstrap intervals over patients (all studies of a drawn patient
  come along), seeded; a replicate whose statistic is undefined (a class missing) is dropped and
  counted (``Interval.n_boot``). Per-marker intervals resample positive and negative patients
  separately (stratified, as pROC does), so every replicate keeps both classes.
- Several seeds (or any strata) are pooled by computing the metric within each stratum and
  averaging over strata; a bootstrap replicate resamples patients within each stratum. The
  interval is over test patients for the seed-averaged result; training randomness enters through
  the average, not the width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

#: Equal-width probability bins of the expected calibration error.
ECE_BINS = 10
#: Temperatures a federated temperature fit evaluates (log-spaced, steps of about 2.5 %).
TEMPERATURES = np.geomspace(0.05, 20.0, 241)
N_BOOT = 2000


# --- the one slice-to-study rule -----------------------------------------------------------------


@dataclass(frozen=True)
class StudyScores:
    """Per study (sorted keys): the combined values and whether the study fell back to all slices."""

    studies: np.ndarray  # [S]
    values: np.ndarray  # [S] or [S, C]
    fallback: np.ndarray  # [S] bool: no slice held predicted hematoma


def holds_predicted_hematoma(predicted_pixels: np.ndarray, min_pixels: int | np.ndarray) -> np.ndarray:
    """Which slices hold predicted hematoma: more predicted pixels than the preprocessing's
    ``min_mask_pixels`` (the rule that also defines which slices carry marker labels)."""
    return np.asarray(predicted_pixels) > np.asarray(min_pixels)


#: How many slices score a study: the ones with the most predicted hematoma. A maximum over every
#: slice that holds some hematoma grows with the number of such slices (a large hematoma spans more
#: of them, and its small edge slices carry noisy scores), so it ranks studies by size as much as by
#: marker; a fixed count does not. Measured (pooled ROI model, seed 0, 960 x 32 crops): macro study
#: AUROC 0.618 with every hematoma slice, 0.658 with the top 3 (docs/design.md §1).
STUDY_SLICES = 3


def rule_slices(predicted_pixels: np.ndarray, min_pixels: int | np.ndarray, k: int = STUDY_SLICES) -> np.ndarray:
    """Positions (within one study's slices, ascending) whose scores make the study's score: the
    ``k`` slices holding the most predicted hematoma (ties: the earlier slice), every slice when
    none holds any."""
    px = np.asarray(predicted_pixels)
    held = np.flatnonzero(holds_predicted_hematoma(px, min_pixels))
    if not held.size:
        return np.arange(px.size)
    return np.sort(held[np.argsort(-px[held], kind="stable")[:k]])


def study_scores_from_slices(
    slice_values: np.ndarray,
    study_ids: Sequence[Any] | np.ndarray,
    predicted_pixels: np.ndarray,
    min_pixels: int | np.ndarray,
) -> StudyScores:
    """THE slice-to-study rule: per study, the maximum over the slices ``rule_slices`` picks (the
    ``STUDY_SLICES`` with the most predicted hematoma: a marker needs to show on one of them); over
    all the study's slices when none holds hematoma.

    Pass a study's brain slices only. ``slice_values`` [N] or [N, C] are logits or probabilities.
    """
    v = np.asarray(slice_values, dtype=np.float64)
    ids = np.asarray(study_ids)
    px = np.asarray(predicted_pixels)
    mins = np.broadcast_to(np.asarray(min_pixels), px.shape)
    if not (ids.shape[0] == v.shape[0] == px.shape[0]):
        raise ValueError(f"{ids.shape[0]} study ids and {px.shape[0]} pixel counts for {v.shape[0]} slices")
    studies, inverse = np.unique(ids, return_inverse=True)
    out = np.empty((studies.size,) + v.shape[1:], dtype=np.float64)
    fallback = np.zeros(studies.size, dtype=bool)
    for i in range(studies.size):
        rows = np.flatnonzero(inverse == i)
        fallback[i] = not holds_predicted_hematoma(px[rows], mins[rows]).any()
        out[i] = v[rows[rule_slices(px[rows], mins[rows])]].max(axis=0)
    return StudyScores(studies, out, fallback)


# --- metrics of one marker -----------------------------------------------------------------------


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def _known(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y, dtype=np.float64).ravel(), np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels for {p.size} scores")
    keep = ~np.isnan(y)
    return y[keep], p[keep]


def _both_classes(y: np.ndarray) -> bool:
    return bool((y == 1).any() and (y == 0).any())


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """THE AUROC of the project (sites, server, report, benchmarks): area under the ROC curve as
    Mann-Whitney's U / (positives x negatives), exact ties counting half (scikit-learn's
    ``roc_auc_score``, the tests' reference); NaN labels left out; NaN without both classes."""
    y, s = _known(y, score)
    if not _both_classes(y):
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size)
    sorted_s = s[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    n_pos = int((y == 1).sum())
    n_neg = y.size - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auprc(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision (scikit-learn's step-wise area under precision-recall); NaN without both classes."""
    y, s = _known(y, score)
    if not _both_classes(y):
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last row of each distinct threshold
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def brier(y: np.ndarray, prob: np.ndarray) -> float:
    """Mean squared difference between probability and outcome; NaN without annotated rows."""
    y, p = _known(y, prob)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def ece(y: np.ndarray, prob: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: over ``n_bins`` equal-width bins of [0, 1], the share of studies
    in a bin times |observed rate - mean probability| (probability 1.0 falls in the last bin)."""
    y, p = _known(y, prob)
    if not y.size:
        return float("nan")
    b = np.minimum((p * n_bins).astype(int), n_bins - 1)
    gap = np.abs(np.bincount(b, weights=y, minlength=n_bins) - np.bincount(b, weights=p, minlength=n_bins))
    return float(gap.sum() / y.size)


def sensitivity_specificity(y: np.ndarray, prob: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) calling ``prob >= threshold`` positive; NaN where a class is missing."""
    y, p = _known(y, prob)
    call = p >= threshold
    pos, neg = y == 1, y == 0
    sens = float(call[pos].mean()) if pos.any() else float("nan")
    spec = float((~call[neg]).mean()) if neg.any() else float("nan")
    return sens, spec


def _candidate_thresholds(p: np.ndarray) -> np.ndarray:
    return np.unique(p)[::-1]  # every distinct score, highest first


def youden_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (highest one on ties); NaN without both classes."""
    y, p = _known(y, prob)
    if not _both_classes(y):
        return float("nan")
    cands = _candidate_thresholds(p)
    j = [sum(sensitivity_specificity(y, p, t)) - 1 for t in cands]
    return float(cands[int(np.argmax(j))])


def threshold_for_sensitivity(y: np.ndarray, prob: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches ``target``; NaN without positives."""
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, p = _known(y, prob)
    if not (y == 1).any():
        return float("nan")
    pos = np.sort(p[y == 1])[::-1]
    return float(pos[int(np.ceil(target * pos.size - 1e-9)) - 1])


def choose_thresholds(labels: np.ndarray, probs: np.ndarray, target_sensitivity: float = 0.0) -> np.ndarray:
    """Per marker column [S, C], the operating threshold chosen on validation: Youden's, or the
    highest reaching ``target_sensitivity`` when that is > 0. Where it is undefined (a class
    missing), 0.5."""
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    out = []
    for c in range(labels.shape[1]):
        y, p = labels[:, c], probs[:, c]
        t = threshold_for_sensitivity(y, p, target_sensitivity) if target_sensitivity > 0 else youden_threshold(y, p)
        out.append(0.5 if np.isnan(t) else t)
    return np.asarray(out)


def macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean AUROC over the columns where it is defined; NaN when none is."""
    vals = [auroc(labels[:, c], scores[:, c]) for c in range(labels.shape[1])]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


# --- study outputs of a model: what evaluation returns and the server / report pool ----------------


@dataclass(frozen=True)
class StudyOutputs:
    """One model's study-level outputs on one or more sites (and seeds).

    ``logits`` are study logits (the one rule applied to slice logits), so probabilities and
    temperature scaling follow from them. ``patients`` are keys that name nobody and are the same
    on every copy of the data (``client.data.dataset.SliceDataset.patient_keys``); ``stratum``
    separates seeds (empty for one seed).
    """

    names: tuple[str, ...]
    studies: np.ndarray  # [S] str
    patients: np.ndarray  # [S] str
    sites: np.ndarray  # [S] str
    labels: np.ndarray  # [S, C] 0/1/NaN
    logits: np.ndarray  # [S, C]
    fallback: np.ndarray  # [S] bool
    stratum: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))  # [S] str, or empty

    def __post_init__(self) -> None:
        n = len(self.studies)
        if self.labels.shape != self.logits.shape or self.labels.shape != (n, len(self.names)):
            raise ValueError(
                f"labels {self.labels.shape} and logits {self.logits.shape} must be [{n}, {len(self.names)}]"
            )
        if not (len(self.patients) == len(self.sites) == len(self.fallback) == n):
            raise ValueError("studies, patients, sites and fallback must have one entry per study")
        if len(self.stratum) not in (0, n):
            raise ValueError("stratum must be empty or have one entry per study")

    def __len__(self) -> int:
        return len(self.studies)

    def probabilities(self, temperature: np.ndarray | None = None) -> np.ndarray:
        """Study probabilities, optionally temperature-scaled per marker."""
        t = np.ones(len(self.names)) if temperature is None else np.asarray(temperature, dtype=np.float64)
        return sigmoid(self.logits / t)

    def strata(self) -> np.ndarray:
        return self.stratum if len(self.stratum) else np.zeros(len(self), dtype=str)

    def subset(self, rows: np.ndarray) -> StudyOutputs:
        s = self.strata()[rows]
        return replace(
            self,
            studies=self.studies[rows],
            patients=self.patients[rows],
            sites=self.sites[rows],
            labels=self.labels[rows],
            logits=self.logits[rows],
            fallback=self.fallback[rows],
            stratum=s,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (NaN labels as None)."""
        return {
            "names": list(self.names),
            "studies": [str(v) for v in self.studies],
            "patients": [str(v) for v in self.patients],
            "sites": [str(v) for v in self.sites],
            "labels": [[None if np.isnan(v) else float(v) for v in row] for row in self.labels],
            "logits": self.logits.tolist(),
            "fallback": [bool(v) for v in self.fallback],
            "stratum": [str(v) for v in self.stratum],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudyOutputs:
        c = len(d["names"])
        return cls(
            tuple(d["names"]),
            np.asarray(d["studies"], dtype=str),
            np.asarray(d["patients"], dtype=str),
            np.asarray(d["sites"], dtype=str),
            np.asarray([[np.nan if v is None else v for v in r] for r in d["labels"]], dtype=np.float64).reshape(-1, c),
            np.asarray(d["logits"], dtype=np.float64).reshape(-1, c),
            np.asarray(d["fallback"], dtype=bool),
            np.asarray(d.get("stratum", []), dtype=str),
        )


def concat_outputs(parts: Sequence[StudyOutputs], strata: Sequence[str] | None = None) -> StudyOutputs:
    """Pool outputs (sites, or seeds with ``strata``: one name per part, e.g. ``"seed=0"``)."""
    if not parts:
        raise ValueError("nothing to pool")
    names = parts[0].names
    if any(p.names != names for p in parts):
        raise ValueError("outputs to pool must have the same label columns")
    if strata is not None and len(strata) != len(parts):
        raise ValueError(f"{len(strata)} strata for {len(parts)} parts")
    if strata is not None:
        stratum = np.concatenate([np.full(len(p), s) for p, s in zip(parts, strata)]).astype(str)
    else:
        stratum = np.concatenate([p.strata() for p in parts]).astype(str)

    def cat(attr: str) -> np.ndarray:
        return np.concatenate([getattr(p, attr) for p in parts])

    return StudyOutputs(
        names,
        cat("studies"),
        cat("patients"),
        cat("sites"),
        cat("labels"),
        cat("logits"),
        cat("fallback"),
        stratum if (stratum != "").any() else np.zeros(0, dtype=str),
    )


def _row_keys(strata: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """One string per row naming (stratum, key); the separator cannot occur in either."""
    return np.asarray([f"{s}\x1f{k}" for s, k in zip(strata, keys)], dtype=str)


def align_outputs(a: StudyOutputs, b: StudyOutputs) -> tuple[StudyOutputs, StudyOutputs]:
    """The two methods' outputs on their common (stratum, study) rows, in the same order; their
    labels must agree (a paired comparison needs the same studies)."""
    ka, kb = (_row_keys(o.strata(), o.studies) for o in (a, b))
    common = sorted(set(ka) & set(kb))
    if not common:
        raise ValueError("the two methods share no study")
    ia, ib = {k: i for i, k in enumerate(ka)}, {k: i for i, k in enumerate(kb)}
    ra, rb = np.asarray([ia[k] for k in common]), np.asarray([ib[k] for k in common])
    a2, b2 = a.subset(ra), b.subset(rb)
    if not np.array_equal(np.isnan(a2.labels), np.isnan(b2.labels)) or not np.allclose(
        np.nan_to_num(a2.labels), np.nan_to_num(b2.labels)
    ):
        raise ValueError("the two methods' labels differ on common studies")
    return a2, b2


# --- bootstrap --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval; ``n_boot`` = replicates that counted."""

    estimate: float
    low: float
    high: float
    n_boot: int

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n_boot": self.n_boot}


def stratum_mean(metric: Callable[[np.ndarray], float], strata: np.ndarray) -> Callable[[np.ndarray], float]:
    """A statistic over row indices: ``metric`` within each stratum (seed), averaged over strata
    where defined (NaN when none is)."""
    strata = np.asarray(strata)
    if np.unique(strata).size <= 1:  # one seed: the metric itself (the bootstrap calls this 2,000 times)
        return lambda idx: float(metric(idx))

    def statistic(idx: np.ndarray) -> float:
        vals = [metric(idx[strata[idx] == s]) for s in np.unique(strata[idx])]
        vals = [v for v in vals if not np.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")

    return statistic


def resamples(
    patients: np.ndarray, strata: np.ndarray | None = None, n_boot: int = N_BOOT, seed: int = 0
) -> list[np.ndarray]:
    """The row indices of each bootstrap replicate: within each stratum, as many patients as it has,
    drawn with replacement; every row (study) of a drawn patient enters once per draw. A patient is
    (stratum, patient key): the same person in two seeds' test sets counts twice. Made once and
    shared by every metric of a row (``marker_intervals``), so its metrics see the same replicates."""
    patients = np.asarray(patients).astype(str)
    if n_boot <= 0 or not patients.size:
        return []
    strata = np.zeros(patients.size, dtype=str) if strata is None else np.asarray(strata).astype(str)
    groups, inverse = np.unique(_row_keys(strata, patients), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    rows_of = np.split(order, np.cumsum(np.bincount(inverse, minlength=groups.size))[:-1])
    group_stratum = strata[[r[0] for r in rows_of]]
    by_stratum = [np.flatnonzero(group_stratum == s) for s in np.unique(group_stratum)]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        drawn = np.concatenate([members[rng.integers(0, members.size, members.size)] for members in by_stratum])
        draws.append(np.concatenate([rows_of[g] for g in drawn]))
    return draws


def interval_over(
    statistic: Callable[[np.ndarray], float], n_rows: int, draws: Sequence[np.ndarray], alpha: float = 0.05
) -> Interval:
    """Percentile interval of ``statistic(row_indices)`` over ``draws`` (``resamples``); replicates
    with an undefined (NaN) statistic are dropped. No draws: the estimate alone."""
    estimate = float(statistic(np.arange(n_rows)))
    values = [v for v in (statistic(idx) for idx in draws) if not np.isnan(v)]
    if not values:
        return Interval(estimate, float("nan"), float("nan"), 0)
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return Interval(estimate, float(low), float(high), len(values))


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    patients: np.ndarray,
    strata: np.ndarray | None = None,
    n_boot: int = N_BOOT,
    alpha: float = 0.05,
    seed: int = 0,
) -> Interval:
    """Percentile interval of ``statistic(row_indices)`` over patient resamples (``resamples``).
    Replicates with an undefined (NaN) statistic are dropped. ``n_boot = 0`` gives the estimate alone."""
    return interval_over(statistic, len(patients), resamples(patients, strata, n_boot, seed), alpha)


def _patient_class(y: np.ndarray, patients: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """Per row, its patient's class for one marker: positive when any of the patient's studies is."""
    key = _row_keys(strata, patients)
    positive = {k for k, v in zip(key, y) if v == 1}
    return np.asarray(["pos" if k in positive else "neg" for k in key])


def class_strata(y: np.ndarray, patients: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """The resampling strata of one label's interval: stratum (seed) x the patient's class, so that
    every replicate keeps both classes (stratified, as pROC does)."""
    return _row_keys(strata, _patient_class(y, patients, strata))


def marker_intervals(
    outputs: StudyOutputs,
    column: int,
    threshold: float = 0.5,
    temperature: np.ndarray | None = None,
    n_boot: int = N_BOOT,
    alpha: float = 0.05,
    seed: int = 0,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One marker's row: n, n_pos, patients, AUROC, AUPRC, Brier, ECE, sensitivity, specificity at
    ``threshold``, each ``{"estimate", "low", "high", "n_boot"}`` (strata averaged, patients
    resampled within stratum and class). A value is NaN where it is undefined (a class missing).
    ``only``: compute just these metrics (each bootstrap costs time)."""
    known = np.flatnonzero(~np.isnan(outputs.labels[:, column]))
    y = outputs.labels[known, column]
    p = outputs.probabilities(temperature)[known, column]
    strata = outputs.strata()[known]
    patients = outputs.patients[known]
    metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "auroc": auroc,
        "auprc": auprc,
        "brier": brier,
        "ece": ece,
        "sensitivity": lambda yy, pp: sensitivity_specificity(yy, pp, threshold)[0],
        "specificity": lambda yy, pp: sensitivity_specificity(yy, pp, threshold)[1],
    }
    resample_strata = class_strata(y, patients, strata)
    row: dict[str, Any] = {
        "marker": outputs.names[column],
        "n": int(y.size),
        "n_pos": int((y == 1).sum()),
        "n_patients": int(np.unique(_row_keys(strata, patients)).size),
        "threshold": float(threshold),
    }
    draws = resamples(patients, resample_strata, n_boot, seed)
    for name, fn in metrics.items():
        if only is not None and name not in only:
            continue
        stat = stratum_mean(lambda idx, fn=fn: fn(y[idx], p[idx]), strata)
        row[name] = interval_over(stat, y.size, draws, alpha).to_dict()
    return row


def summarise(
    outputs: StudyOutputs,
    thresholds: Sequence[float] | np.ndarray | None = None,
    temperature: np.ndarray | None = None,
    columns: Sequence[int] | None = None,
    n_boot: int = N_BOOT,
    alpha: float = 0.05,
    seed: int = 0,
    only: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The headline table: one ``marker_intervals`` row per column (all by default), over every
    study of ``outputs`` (pool the sites first with ``concat_outputs``); ``only``: just these metrics."""
    cols = range(len(outputs.names)) if columns is None else columns
    th = np.full(len(outputs.names), 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    return [marker_intervals(outputs, c, float(th[c]), temperature, n_boot, alpha, seed, only) for c in cols]


def per_site_rows(
    outputs: StudyOutputs,
    thresholds: Sequence[float] | np.ndarray | None = None,
    temperature: np.ndarray | None = None,
    columns: Sequence[int] | None = None,
    n_boot: int = N_BOOT,
    alpha: float = 0.05,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The secondary table: ``summarise`` per site, each row with its ``site``, n and n_pos."""
    rows = []
    for site in np.unique(outputs.sites):
        part = outputs.subset(np.flatnonzero(outputs.sites == site))
        rows += [
            {"site": str(site), **r} for r in summarise(part, thresholds, temperature, columns, n_boot, alpha, seed)
        ]
    return rows


def paired_difference(
    a: StudyOutputs,
    b: StudyOutputs,
    columns: Sequence[int] | None = None,
    n_boot: int = N_BOOT,
    alpha: float = 0.05,
    seed: int = 0,
) -> Interval:
    """Macro-AUROC of ``a`` minus that of ``b`` on their common studies, with a paired patient
    bootstrap (one resample scores both methods). ``columns`` default to all (pass the markers)."""
    a, b = align_outputs(a, b)
    cols = list(range(len(a.names))) if columns is None else list(columns)
    y, sa, sb = a.labels[:, cols], a.logits[:, cols], b.logits[:, cols]
    diff = stratum_mean(lambda idx: macro_auroc(y[idx], sa[idx]) - macro_auroc(y[idx], sb[idx]), a.strata())
    return bootstrap_ci(diff, a.patients, a.strata(), n_boot, alpha, seed)


def dice_interval(
    counts: np.ndarray, patients: np.ndarray, n_boot: int = N_BOOT, alpha: float = 0.05, seed: int = 0
) -> Interval:
    """Mean per-study Dice with its patient bootstrap interval; ``counts`` [S, 3] = TP, FP, FN per
    study (a study with nothing to find and nothing found scores 1)."""
    tp, fp, fn = np.asarray(counts, dtype=np.float64).T
    den = 2 * tp + fp + fn
    dice = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 1.0)
    return bootstrap_ci(
        lambda idx: float(dice[idx].mean()) if idx.size else float("nan"), patients, None, n_boot, alpha, seed
    )


# --- temperature scaling -----------------------------------------------------------------------------


def temperature_nll_stats(
    logits: np.ndarray, labels: np.ndarray, temperatures: np.ndarray = TEMPERATURES
) -> np.ndarray:
    """What a site sends for a federated temperature fit: ``[T, C]`` summed binary NLL of its
    validation studies at each temperature of the grid, per marker. Sums over studies: no study's
    logit can be read back from them (for more than one study)."""
    z = np.atleast_2d(np.asarray(logits, dtype=np.float64).T).T
    y = np.atleast_2d(np.asarray(labels, dtype=np.float64).T).T
    known = ~np.isnan(y)
    yk = np.where(known, y, 0.0)
    scaled = z[None] / np.asarray(temperatures)[:, None, None]  # [T, S, C]
    nll = np.logaddexp(0.0, scaled) - yk[None] * scaled  # binary cross-entropy of sigmoid(z / T)
    return np.where(known[None], nll, 0.0).sum(axis=1)


def fit_temperature_from_stats(stats: np.ndarray, temperatures: np.ndarray = TEMPERATURES) -> np.ndarray:
    """The server's half: per marker, the grid temperature with the least summed NLL (the sum of
    the sites' ``temperature_nll_stats``). A marker nobody annotated keeps 1 (no scaling)."""
    stats = np.asarray(stats, dtype=np.float64)
    best = np.asarray(temperatures)[np.argmin(stats, axis=0)]
    return np.where(np.ptp(stats, axis=0) > 0, best, 1.0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, temperatures: np.ndarray = TEMPERATURES) -> np.ndarray:
    """Per-marker temperature minimising the validation NLL of pooled study logits (on the grid,
    so that it equals the federated fit from the same studies)."""
    return fit_temperature_from_stats(temperature_nll_stats(logits, labels, temperatures), temperatures)


def slice_auroc_on_hematoma(
    labels: np.ndarray, scores: np.ndarray, holds_hematoma: np.ndarray, names: Sequence[str]
) -> dict[str, float]:
    """Slice-level AUROC per label over the slices whose reference mask holds hematoma only: on
    every other slice each marker is 0 by construction, so counting them measures hematoma
    detection, not the marker."""
    h = np.asarray(holds_hematoma, dtype=bool)
    return {n: auroc(np.asarray(labels)[h, c], np.asarray(scores)[h, c]) for c, n in enumerate(names)}
