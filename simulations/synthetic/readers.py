"""Labels as readers' calls, not the truth: per-marker noise calibrated to published agreement.

A reader looks at a study and sees some *evidence* for a marker: its severity when the marker is
there (0 barely visible .. 1 obvious), or the strength of a mimic that imitates it when it is not
(``mimics.MIMIC_EVIDENCE``), else none. The reader calls the marker present with probability

    p = sigmoid((evidence - threshold) / tau)

where ``threshold`` (``READER_THRESHOLD`` plus the site's tendency) is where a reader is as likely
to call it as not, and ``tau`` (per marker) is how much readers vary. Two readers of the same study
draw their calls independently given the evidence; ``tau`` is solved so that their expected
Gwet's AC1 equals the published inter-rater agreement for that marker (``READER_AC1``). With
``noise`` 0 the call is the truth (threshold and tau shrink to 0, mimic evidence vanishes).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

#: Inter-rater agreement (Gwet's AC1, 15 raters x 60 ICH cases) per marker: fluid level 0.84,
#: hypodensity 0.67, blend 0.62, Barras shape (our irregular margin) 0.46; Eur Radiol 2022;32:6126.
READER_AC1: dict[str, float] = {
    "hypodensity": 0.67,
    "irregular_margin": 0.46,
    "blend_sign": 0.62,
    "fluid_level": 0.84,
}
#: Evidence at which a reader calls a marker half of the time (subtler markers are mostly missed).
READER_THRESHOLD = 0.25
#: Draws used to solve tau (fixed seed: the solution is a pure function of the cohort model).
_CALIBRATION_DRAWS = 40_000


def call_probability(evidence: np.ndarray, threshold: float, tau: float) -> np.ndarray:
    """Probability that a reader calls the marker, given the evidence he sees."""
    e = np.asarray(evidence, dtype=float)
    if tau <= 0:
        return (e > threshold).astype(float)
    return 1.0 / (1.0 + np.exp(-np.clip((e - threshold) / tau, -60.0, 60.0)))


def reader_calls(evidence: np.ndarray, uniforms: np.ndarray, threshold: float, tau: float) -> np.ndarray:
    """One reader's calls (0/1) from uniform draws: a call is ``u < p`` (deterministic per draw)."""
    return (np.asarray(uniforms) < call_probability(evidence, threshold, tau)).astype(np.int8)


def gwet_ac1(a: np.ndarray, b: np.ndarray) -> float:
    """Gwet's AC1 of two raters' binary calls: (Pa - Pe) / (1 - Pe), Pe = 2 q (1 - q)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    pa = float(np.mean(a == b))
    q = float((a.mean() + b.mean()) / 2.0)
    pe = 2.0 * q * (1.0 - q)
    return (pa - pe) / (1.0 - pe) if pe < 1.0 else 1.0


def expected_ac1(evidence: np.ndarray, threshold: float, tau: float) -> float:
    """AC1 two conditionally independent readers reach on average over these studies."""
    p = call_probability(evidence, threshold, tau)
    pa = float(np.mean(p * p + (1 - p) * (1 - p)))
    q = float(np.mean(p))
    pe = 2.0 * q * (1.0 - q)
    return (pa - pe) / (1.0 - pe) if pe < 1.0 else 1.0


def solve_tau(evidence: np.ndarray, threshold: float, target_ac1: float) -> float:
    """The reader spread ``tau`` at which the expected AC1 equals ``target_ac1`` (bisection in log
    tau; AC1 falls from 1 at tau -> 0 towards 0 as calls become coin flips)."""
    lo, hi = -8.0, 3.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if expected_ac1(evidence, threshold, float(np.exp(mid))) > target_ac1:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


@lru_cache(maxsize=8)
def calibrated_tau(marker: str) -> float:
    """``tau`` for ``marker``, solved on the reference cohort (``cohort.reference_cohort``)."""
    from simulations.synthetic.cohort import reference_evidence  # cohort draws; readers interpret

    return solve_tau(reference_evidence(marker), READER_THRESHOLD, READER_AC1[marker])


def reader_params(marker: str, noise: float, tendency: float) -> tuple[float, float]:
    """(threshold, tau) of a site's readers for ``marker`` at ``noise`` (1 = calibrated, 0 = truth)."""
    return max(0.0, (READER_THRESHOLD + tendency) * noise), calibrated_tau(marker) * noise


def study_evidence(present: bool, severity: float, mimic: float, noise: float) -> float:
    """What a reader sees: the severity of a present marker, else the mimic's evidence (which
    fades with ``noise``, so that at 0 only true markers are seen)."""
    return max(severity, 1e-3) if present else mimic * noise


def label_probability(evidence: np.ndarray, threshold: float, tau: float, readers: int) -> np.ndarray:
    """Probability that the written label is 1 given what the readers saw: one reader's call
    probability ``p``, or with two readers and an adjudicator (all three drawing independently
    at ``p``) ``p^2 + 2 p (1 - p) p = 3 p^2 - 2 p^3``. Scoring studies by it is the best any observer
    of the images can do against the labels (the upper bound ``ceiling`` reports)."""
    p = call_probability(evidence, threshold, tau)
    return p if readers == 1 else 3.0 * p**2 - 2.0 * p**3


def adjudicate(calls: Sequence[np.ndarray], adjudicator: np.ndarray) -> np.ndarray:
    """One reader's calls, or two readers' calls with the adjudicator deciding where they differ."""
    if len(calls) == 1:
        return np.asarray(calls[0])
    a, b = (np.asarray(c) for c in calls)
    return np.where(a == b, a, np.asarray(adjudicator)).astype(np.int8)
