"""``common.secure_validation``: the packed validation sums of several sites, masked and summed, decode to
the plain sum (counts exactly, NLL sums to ``nll_tolerance``), so the server chooses the same round,
temperatures and thresholds; values the encoding cannot carry are refused, never clipped."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from common.secure_sum import SecureSumError, generate_key_pair, mask_vector, unmask_sum
from common.secure_validation import (
    LIMB_BITS,
    MAX_SITES,
    nll_tolerance,
    pack_validation,
    unpack_validation,
    vector_length,
)
from common.study_metrics import TEMPERATURES
from common.validation import N_BINS, ValidationStats, calibration_meta, selection_score

N_COLS = 5
MARKERS = range(4)


def site_stats(seed: int, shift: float, n: int = 30) -> ValidationStats:
    """One site's sums of one round: logits that separate the labels by ``shift``, some labels unknown."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, N_COLS)) < 0.35).astype(np.float64)
    labels[rng.random((n, N_COLS)) < 0.1] = np.nan
    logits = rng.normal(0.0, 1.5, (n, N_COLS)) + shift * np.nan_to_num(labels)
    logits[0, 0] = 40.0  # past the histogram's range (an end bin) and a large NLL at T = 0.05
    dice = [(int(rng.integers(0, 5000)), int(rng.integers(0, 900)), int(rng.integers(0, 900))) for _ in range(n)]
    return ValidationStats.from_outputs(SimpleNamespace(logits=logits, labels=labels), dice)


def secure_total(parts: list[ValidationStats], nodes: list[int]) -> ValidationStats:
    """What the server decodes: every site's packed sums masked in one session, added mod 2^32."""
    keys = {n: generate_key_pair() for n in nodes}
    peers = {n: public for n, (_, public) in keys.items()}
    masked = [mask_vector(pack_validation(s), n, keys[n][0], peers, "validation-3-1") for s, n in zip(parts, nodes)]
    return unpack_validation(unmask_sum(masked), N_COLS)


def test_layout_and_limbs():
    assert vector_length(N_COLS) == 2 * N_BINS * N_COLS + 4 * len(TEMPERATURES) * N_COLS + 12
    words = pack_validation(site_stats(0, 1.0))
    assert words.shape == (vector_length(N_COLS),)
    nll_and_dice = words[2 * N_BINS * N_COLS :]
    assert nll_and_dice.max() < 2**LIMB_BITS  # every limb fits 16 bits: < 2^16 sites never wrap
    assert MAX_SITES == 2**16


def test_secure_total_equals_the_plain_sum_and_chooses_the_same():
    """A small federation of 4 sites over 3 rounds: the decoded totals equal the plain totals (bins and
    Dice exactly, NLL within n_sites * 2^-33), and the round chosen, the temperatures, thresholds and
    scores from them are those the plain totals give."""
    nodes = [2**63 + 5, 17, 2**40, 3]
    plain_rounds, secure_rounds = [], []
    for rnd, shift in enumerate((0.2, 1.5, 0.9)):
        parts = [site_stats(10 * rnd + i, shift) for i in range(len(nodes))]
        plain = sum(parts[1:], parts[0])
        secure = secure_total(parts, nodes)
        np.testing.assert_array_equal(secure.pos_hist, plain.pos_hist)
        np.testing.assert_array_equal(secure.neg_hist, plain.neg_hist)
        assert (secure.dice_tp, secure.dice_fp, secure.dice_fn) == (plain.dice_tp, plain.dice_fp, plain.dice_fn)
        assert plain.temperature_nll.max() > 1000  # the large-logit study: a wide range is carried
        np.testing.assert_allclose(secure.temperature_nll, plain.temperature_nll, rtol=1e-12, atol=nll_tolerance(4))
        plain_rounds.append(plain)
        secure_rounds.append(secure)
    names = ["hypodensity", "irregular_margin", "blend_sign", "fluid_level", "expansion"]
    for plain, secure in zip(plain_rounds, secure_rounds):
        assert selection_score(secure, 2, MARKERS) == selection_score(plain, 2, MARKERS)
        assert calibration_meta(secure, names, 0.0) == calibration_meta(plain, names, 0.0)
        assert calibration_meta(secure, names, 0.8) == calibration_meta(plain, names, 0.8)
        assert secure.dice() == plain.dice()
    scores = [selection_score(s, 2, MARKERS) for s in secure_rounds]
    assert int(np.argmax(scores)) == int(np.argmax([selection_score(p, 2, MARKERS) for p in plain_rounds])) == 1


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.temperature_nll.__setitem__((0, 0), np.nan), "NLL"),
        (lambda s: s.temperature_nll.__setitem__((0, 0), 2.0**33), "NLL"),
        (lambda s: s.temperature_nll.__setitem__((0, 0), -0.5), "NLL"),
        (lambda s: s.pos_hist.__setitem__((0, 0), 1.5), "bin counts"),
        (lambda s: s.neg_hist.__setitem__((0, 0), -1.0), "bin counts"),
        (lambda s: setattr(s, "dice_tp", 2.5), "Dice"),
    ],
)
def test_what_the_encoding_cannot_carry_is_refused(change, match):
    stats = site_stats(1, 1.0)
    change(stats)
    with pytest.raises(SecureSumError, match=match):
        pack_validation(stats)


def test_unpack_checks_the_length():
    with pytest.raises(ValueError, match="words"):
        unpack_validation(np.zeros(vector_length(N_COLS) - 1, dtype=np.int64), N_COLS)
