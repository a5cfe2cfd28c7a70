"""Validation sums through the pairwise-mask secure sum: the server learns only their total over sites.

Why: the sums a round is chosen by (``common.validation.ValidationStats``) hold, per marker, how many
positive and negative validation studies fall in each of 1,024 study-logit bins 1/64 logit wide. Read
alone, one site's histograms give back every one of its validation studies' logit (to 1/128) and
label (issue 27). So a site never sends them in the clear: it packs every sum into one vector of
integers (``pack_validation``) and sends it only masked with ``common.secure_sum.mask_vector``; the
server adds the masked vectors of a session and decodes the total (``unpack_validation``). What the
server chooses from the total (the round's pooled AUROC or Dice, temperatures, thresholds) is what it
chose from the plain sums, to the precision below.

The vector, in order (C columns, B = ``N_BINS`` bins, T = ``len(TEMPERATURES)``):

- ``pos_hist``, ``neg_hist`` [B, C]: one word per bin (study counts; exact while the total of a bin over
  all sites is below 2^32 studies);
- ``temperature_nll`` [T, C]: fixed point with ``NLL_FRACTION_BITS`` (32) fraction bits, each value cut
  into ``LIMBS`` (4) words of ``LIMB_BITS`` (16) bits, low word first: a site's sum must lie in
  [0, 2^32) nats (a study adds at most ~|logit| / 0.05 nats);
- ``dice_tp``, ``dice_fp``, ``dice_fn``: integers below 2^64, in 4 words of 16 bits each.

Every word of a 16-bit limb is below 2^16, so the sum over fewer than ``MAX_SITES`` (2^16) sites never
wraps modulo 2^32, and the server rebuilds each total exactly from its limbs (Python integers). The
counts and Dice totals are exact; each NLL total is off from the plain float sum by at most
``nll_tolerance(n_sites)`` = n_sites * 2^-33 (each site rounds each value once, by at most half a step),
against per-study NLL sums of order 0.1-1000 nats: the temperature (the grid point of least summed NLL)
can differ only where two grid points' sums lie within twice that, a tie in all but the last bits.
"""

from __future__ import annotations

import numpy as np

from common.secure_sum import MODULUS, SecureSumError, check_values
from common.study_metrics import TEMPERATURES
from common.validation import N_BINS, ValidationStats

#: Fixed-point fraction bits of the NLL sums.
NLL_FRACTION_BITS = 32
#: Each NLL sum and Dice count travels as ``LIMBS`` words of ``LIMB_BITS`` bits.
LIMB_BITS = 16
LIMBS = 4
#: More sites than this could carry a limb past 2^32 (the ring's modulus): refused.
MAX_SITES = 1 << (32 - LIMB_BITS)
_NLL_SCALE = float(1 << NLL_FRACTION_BITS)
_LIMB_MASK = (1 << LIMB_BITS) - 1
#: A float NLL this far below 0 is a rounding of 0 (log-sum-exp), not a broken sum.
_NEGATIVE_ZERO = 1e-9


def vector_length(n_labels: int) -> int:
    """Words in one site's packed vector for ``n_labels`` columns."""
    return 2 * N_BINS * n_labels + len(TEMPERATURES) * n_labels * LIMBS + 3 * LIMBS


def nll_tolerance(n_sites: int) -> float:
    """How far a decoded NLL total may lie from the plain float sum of ``n_sites`` sites' sums."""
    return n_sites * 2.0 ** -(NLL_FRACTION_BITS + 1)


def _limbs(values: np.ndarray) -> np.ndarray:
    """Non-negative integers below 2^64 (uint64) as ``LIMBS`` 16-bit words each, low word first."""
    shifts = np.arange(LIMBS, dtype=np.uint64) * np.uint64(LIMB_BITS)
    return ((values.astype(np.uint64)[:, None] >> shifts[None]) & np.uint64(_LIMB_MASK)).ravel()


def _from_limbs(words: np.ndarray) -> list[int]:
    """``_limbs`` reversed on a sum (each word may have grown past 16 bits): exact Python integers."""
    rows = np.asarray(words, dtype=np.int64).reshape(-1, LIMBS)
    return [sum(int(w) << (LIMB_BITS * k) for k, w in enumerate(row)) for row in rows]


def pack_validation(stats: ValidationStats) -> np.ndarray:
    """One site's validation sums as the vector of words the secure sum adds up (uint64, each < 2^32).

    Raises ``SecureSumError`` for a value the encoding cannot carry exactly (a non-integer or negative
    count, a non-finite NLL or one of 2^32 nats or more): such a site sends nothing rather than a
    wrong or clipped sum.
    """
    hist = np.concatenate([np.asarray(stats.pos_hist, np.float64).ravel(), np.asarray(stats.neg_hist).ravel()])
    if not (np.isfinite(hist).all() and (hist == np.round(hist)).all() and (hist >= 0).all()):
        raise SecureSumError("validation bin counts must be non-negative integers")
    if hist.size and hist.max() >= MODULUS:
        raise SecureSumError("a validation bin count reaches 2^32")
    nll = np.asarray(stats.temperature_nll, dtype=np.float64).ravel()
    if not np.isfinite(nll).all() or (nll < -_NEGATIVE_ZERO).any() or (nll >= MODULUS - 1).any():
        raise SecureSumError("validation NLL sums must be finite and in [0, 2^32 - 1) nats")
    fixed = np.rint(np.maximum(nll, 0.0) * _NLL_SCALE).astype(np.uint64)
    dice = np.asarray([stats.dice_tp, stats.dice_fp, stats.dice_fn], dtype=np.float64)
    if not (np.isfinite(dice).all() and (dice == np.round(dice)).all() and (dice >= 0).all() and (dice < 2**64).all()):
        raise SecureSumError("Dice pixel counts must be non-negative integers below 2^64")
    words = np.concatenate([hist.astype(np.uint64), _limbs(fixed), _limbs(dice.astype(np.uint64))])
    return check_values(words)


def unpack_validation(total: np.ndarray, n_labels: int) -> ValidationStats:
    """The summed vector (``common.secure_sum.unmask_sum`` of every site's masked ``pack_validation``)
    as the summed ``ValidationStats``."""
    total = np.asarray(total, dtype=np.int64)
    if total.shape != (vector_length(n_labels),):
        raise ValueError(f"a validation vector for {n_labels} columns has {vector_length(n_labels)} words")
    b, t = N_BINS * n_labels, len(TEMPERATURES) * n_labels
    pos, neg = total[:b], total[b : 2 * b]
    nll = np.asarray(_from_limbs(total[2 * b : 2 * b + t * LIMBS]), dtype=np.float64) / _NLL_SCALE
    dice = _from_limbs(total[2 * b + t * LIMBS :])
    return ValidationStats(
        nll.reshape(len(TEMPERATURES), n_labels),
        pos.reshape(N_BINS, n_labels).astype(np.float64),
        neg.reshape(N_BINS, n_labels).astype(np.float64),
        *(float(v) for v in dice),
    )
