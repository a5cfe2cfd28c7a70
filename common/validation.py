"""Model selection, operating thresholds and temperatures from validation studies, federated-safe.

A federated server never sees a study's logit (docs/design.md §5): each site summarises its
validation studies as sums, the sums of all sites are added up, and the server chooses from the totals alone:

- ``temperature_nll`` [T, C]: summed NLL at each grid temperature (``common.study_metrics``);
- ``pos_hist`` / ``neg_hist`` [B, C]: how many positive / negative validation studies fall in each
  study-logit bin (``LOGIT_EDGES``). Summed over sites they give the pooled ROC at the bin edges, so
  the pooled validation AUROC (ties within a bin count half), Youden's threshold and the threshold
  for a target sensitivity; a bin is 1/64 logit wide, so the threshold is exact to that width (a
  near-constant classifier's study logits, spread over a few tenths of a logit, still rank: with
  0.125-wide bins they fell into one or two bins and the pooled AUROC read exactly 0.500);
- ``dice_tp`` / ``dice_fp`` / ``dice_fn``: pixel counts of the validation studies (stage-1 Dice).

Read alone, one site's histograms would give back each of its studies' logit (to 1/128) and label, so
a deep-model site sends them only through the secure sum (``common.secure_validation``): the server
decodes their total over the sites, never one site's (the radiomics federation still sends its
candidates' sums with ``to_metrics``). The simulation's local and pooled baselines run in one process
and use the same functions on their own validation studies, so every method is selected and
calibrated by the same rule.

Selection metric: stage 2 (and any run with a trained classifier): the pooled validation macro
study-AUROC over the markers; stage 1: the pooled validation Dice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.study_metrics import TEMPERATURES, StudyOutputs, fit_temperature_from_stats, sigmoid, temperature_nll_stats

#: Study-logit bin edges of the validation histograms (values outside fall in the end bins).
LOGIT_EDGES = np.linspace(-8.0, 8.0, 1025)
N_BINS = len(LOGIT_EDGES) - 1


def logit_histograms(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per marker, the counts of positive and negative studies in each logit bin: [B, C] each."""
    z, y = np.atleast_2d(np.asarray(logits, dtype=np.float64)), np.atleast_2d(np.asarray(labels, dtype=np.float64))
    bins = np.clip(np.searchsorted(LOGIT_EDGES, z, side="right") - 1, 0, N_BINS - 1)
    pos, neg = np.zeros((N_BINS, z.shape[1])), np.zeros((N_BINS, z.shape[1]))
    for c in range(z.shape[1]):
        pos[:, c] = np.bincount(bins[y[:, c] == 1, c], minlength=N_BINS)
        neg[:, c] = np.bincount(bins[y[:, c] == 0, c], minlength=N_BINS)
    return pos, neg


@dataclass
class ValidationStats:
    """Sums over validation studies (of one site, or added over sites); see the module docstring."""

    temperature_nll: np.ndarray  # [T, C]
    pos_hist: np.ndarray  # [B, C]
    neg_hist: np.ndarray  # [B, C]
    dice_tp: float = 0.0
    dice_fp: float = 0.0
    dice_fn: float = 0.0

    @classmethod
    def from_outputs(
        cls, outputs: StudyOutputs, dice_counts: Iterable[tuple[float, float, float]] = ()
    ) -> ValidationStats:
        pos, neg = logit_histograms(outputs.logits, outputs.labels)
        counts = np.asarray(list(dice_counts), dtype=np.float64).reshape(-1, 3).sum(axis=0)
        return cls(temperature_nll_stats(outputs.logits, outputs.labels), pos, neg, *map(float, counts))

    def __add__(self, other: ValidationStats) -> ValidationStats:
        return ValidationStats(
            self.temperature_nll + other.temperature_nll,
            self.pos_hist + other.pos_hist,
            self.neg_hist + other.neg_hist,
            self.dice_tp + other.dice_tp,
            self.dice_fp + other.dice_fp,
            self.dice_fn + other.dice_fn,
        )

    # --- plain metric lists: the radiomics replies' (a deep evaluate reply sends them masked instead) ---

    def to_metrics(self, prefix: str = "val/") -> dict[str, int | list[int] | list[float]]:
        return {
            f"{prefix}temperature_nll": self.temperature_nll.ravel().tolist(),
            f"{prefix}pos_hist": [int(v) for v in self.pos_hist.ravel()],  # counts
            f"{prefix}neg_hist": [int(v) for v in self.neg_hist.ravel()],
            f"{prefix}dice_tp": int(self.dice_tp),
            f"{prefix}dice_fp": int(self.dice_fp),
            f"{prefix}dice_fn": int(self.dice_fn),
        }

    @classmethod
    def from_metrics(cls, m: Mapping[str, object], n_labels: int, prefix: str = "val/") -> ValidationStats:
        """Parsed back; ValueError when a site's arrays have the wrong size."""

        def grid(key: str, rows: int) -> np.ndarray:
            a = np.asarray(m[f"{prefix}{key}"], dtype=np.float64)
            if a.size != rows * n_labels:
                raise ValueError(f"{prefix}{key}: {a.size} values, expected {rows} x {n_labels}")
            return a.reshape(rows, n_labels)

        return cls(
            grid("temperature_nll", len(TEMPERATURES)),
            grid("pos_hist", N_BINS),
            grid("neg_hist", N_BINS),
            *(float(m[f"{prefix}dice_{k}"]) for k in ("tp", "fp", "fn")),
        )

    # --- what the server (or a baseline) chooses from the sums ------------------------------------

    def dice(self) -> float:
        den = 2 * self.dice_tp + self.dice_fp + self.dice_fn
        return float(2 * self.dice_tp / den) if den > 0 else float("nan")

    def auroc(self) -> np.ndarray:
        """Pooled validation AUROC per column from the histograms (ties in a bin count half); NaN
        where a class is missing."""
        p, n = self.pos_hist, self.neg_hist
        below = np.cumsum(n, axis=0) - n  # negatives in lower bins
        wins = (p * (below + 0.5 * n)).sum(axis=0)
        total = p.sum(axis=0) * n.sum(axis=0)
        return np.where(total > 0, wins / np.where(total > 0, total, 1), np.nan)

    def macro_auroc(self, columns: Iterable[int]) -> float:
        vals = [v for v in self.auroc()[list(columns)] if not np.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")

    def temperature(self) -> np.ndarray:
        return fit_temperature_from_stats(self.temperature_nll)

    def thresholds(self, target_sensitivity: float = 0.0, temperature: np.ndarray | None = None) -> np.ndarray:
        """Per column, the operating threshold on the (temperature-scaled) probability: Youden's
        (target 0) or the highest bin edge whose pooled sensitivity reaches the target; 0.5 where
        a class is missing."""
        if not 0 <= target_sensitivity <= 1:
            raise ValueError(f"target sensitivity must be in [0, 1], got {target_sensitivity}")
        t = np.ones(self.pos_hist.shape[1]) if temperature is None else np.asarray(temperature, dtype=np.float64)
        # Calling positive at bin edge b: every study in bin >= b.
        tp = np.cumsum(self.pos_hist[::-1], axis=0)[::-1]
        fp = np.cumsum(self.neg_hist[::-1], axis=0)[::-1]
        out = np.full(self.pos_hist.shape[1], 0.5)
        for c in range(len(out)):
            n_pos, n_neg = tp[0, c], fp[0, c]
            if n_pos == 0 or (target_sensitivity == 0 and n_neg == 0):
                continue
            sens = tp[:, c] / n_pos
            if target_sensitivity > 0:
                b = int(np.flatnonzero(sens >= target_sensitivity - 1e-9).max())
            else:
                j = sens + (1 - fp[:, c] / n_neg) - 1
                b = int(np.flatnonzero(j >= j.max() - 1e-12).max())  # the highest threshold on ties
            out[c] = float(sigmoid(np.asarray(LOGIT_EDGES[b] / t[c])))
        return out


def metric_lengths(n_labels: int, prefix: str = "val/") -> dict[str, int]:
    """The validation keys of an evaluate reply and the length of each list (0: one count), for a
    reply validator: ``temperature_nll`` finite floats >= 0, every other key non-negative counts."""
    return {
        f"{prefix}temperature_nll": len(TEMPERATURES) * n_labels,
        f"{prefix}pos_hist": N_BINS * n_labels,
        f"{prefix}neg_hist": N_BINS * n_labels,
        **{f"{prefix}dice_{k}": 0 for k in ("tp", "fp", "fn")},
    }


def selectable(stage: int, stage2_rounds: int) -> bool:
    """Whether a round of ``stage`` can become the chosen model, so is worth scoring on validation:
    a stage-2 round always beats a stage-1 one, so stage-1 rounds count only in a run without
    stage 2 (skipping them saves a validation pass per stage-1 round)."""
    return stage == 2 or stage2_rounds == 0


#: ``eval.test-rounds``: which rounds score the model on the test patients (every round, the last round
#: of each stage, or the run's last round); rounds that can be chosen are scored on validation anyway.
TEST_ROUNDS: tuple[str, ...] = ("every", "stage-ends", "last")


def evaluated(rnd: int, stage1: int, stage2: int, test_rounds: str) -> bool:
    """Whether round ``rnd`` of a ``stage1`` + ``stage2`` schedule is scored: a test round of
    ``test_rounds``, or a round that can be chosen (``selectable``: it needs its validation sums).
    Skipping the others is what lets a large test split fit a short run (one pass per scored round)."""
    stage = 1 if rnd <= stage1 else 2
    if test_rounds == "every" or selectable(stage, stage2):
        return True
    return rnd == stage1 + stage2 or (test_rounds == "stage-ends" and rnd == stage1)


def selection_score(stats: ValidationStats, stage: int, marker_columns: Iterable[int]) -> float:
    """The validation metric a round (or a baseline's epoch) is chosen by: stage 2 the pooled macro
    study-AUROC over the markers, stage 1 the pooled Dice. NaN when undefined (never chosen then)."""
    return stats.macro_auroc(marker_columns) if stage == 2 else stats.dice()


def calibration_meta(stats: ValidationStats, names: Iterable[str], target_sensitivity: float = 0.0) -> dict:
    """What a checkpoint's meta carries for ``hemexp predict``: per-marker ``temperature`` and
    ``thresholds`` (on the temperature-scaled probability), both chosen on validation."""
    names = list(names)
    temp = stats.temperature()
    th = stats.thresholds(target_sensitivity, temp)
    return {
        "temperature": {n: float(v) for n, v in zip(names, temp)},
        "thresholds": {n: float(v) for n, v in zip(names, th)},
        "target_sensitivity": float(target_sensitivity),
    }


#: Threshold and temperature of an output when a checkpoint names none (trained before validation choices).
DEFAULT_THRESHOLD, DEFAULT_TEMPERATURE = 0.5, 1.0


@dataclass(frozen=True)
class OperatingPoint:
    """Per output: the temperature and the threshold a checkpoint's meta carries (``calibration_meta``
    wrote them), defaults where it has none."""

    temperature: dict[str, float]
    thresholds: dict[str, float]
    source: str  # "validation" | "default"

    @classmethod
    def of(cls, labels: Sequence[str], meta: Mapping[str, Any]) -> OperatingPoint:
        temp, th = meta.get("temperature") or {}, meta.get("thresholds") or {}
        return cls(
            {n: float(temp.get(n, DEFAULT_TEMPERATURE)) for n in labels},
            {n: float(th.get(n, DEFAULT_THRESHOLD)) for n in labels},
            "validation" if th and temp else "default",
        )

    def arrays(self, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Temperature and thresholds as arrays over ``labels``."""
        return (
            np.asarray([self.temperature[n] for n in labels]),
            np.asarray([self.thresholds[n] for n in labels]),
        )
