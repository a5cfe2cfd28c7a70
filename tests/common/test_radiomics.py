"""The radiomics features of constructed hematomas, the standardisation from sums, the logistic
regression's gradient steps, and the L2 choice on validation sums."""

from __future__ import annotations

import numpy as np
import pytest

from common.radiomics import (
    DEFINED_WHEN_EMPTY,
    FEATURE_NAMES,
    N_FEATURES,
    RadiomicsModel,
    candidate_stats,
    choose,
    chosen_stats,
    chosen_weights,
    feature_sums,
    logistic_step,
    marker_pos_weight,
    predict_logits,
    standardise,
    standardised,
    study_features,
    to_hu,
    weighted_bce,
)
from common.study_metrics import auroc

S = 64
WINDOW = (0.0, 80.0)
ROWS, COLS = np.mgrid[:S, :S]
DISK = (ROWS - 32) ** 2 + (COLS - 32) ** 2 <= 10**2
HEAD = (ROWS - 32) ** 2 + (COLS - 32) ** 2 <= 28**2
#: uint8 values of the brain, the clot and a darker layer (HU = v / 255 * 80).
BRAIN, CLOT, LIGHT = 96, 204, 128


def f(values: np.ndarray, name: str) -> float:
    return float(values[FEATURE_NAMES.index(name)])


def disk_image(layered: bool) -> np.ndarray:
    """[1, S, S]: a dense disk in the brain; ``layered``: lighter serum above, denser cells below."""
    img = np.where(HEAD, BRAIN, 0).astype(np.uint8)
    img[DISK] = CLOT
    if layered:
        img[DISK & (ROWS < 32)] = LIGHT
    return img[None]


def disk_study(layered: bool = False, pixel_mm: float = 0.5) -> np.ndarray:
    return study_features(disk_image(layered), DISK[None].astype(np.uint8), WINDOW, pixel_mm, 5.0, 10)


def test_a_disk_of_known_hu_in_a_known_ring():
    x = disk_study()
    assert len(FEATURE_NAMES) == N_FEATURES and 25 <= N_FEATURES <= 35 and x.shape == (N_FEATURES,)
    clot, brain = to_hu(CLOT, WINDOW), to_hu(BRAIN, WINDOW)
    assert clot == pytest.approx(CLOT / 255 * 80)
    for p in (5, 10, 25, 50, 75, 90, 95):
        assert f(x, f"hu_p{p:02d}") == pytest.approx(clot)
    assert (f(x, "hu_mean"), f(x, "hu_std"), f(x, "hu_skewness"), f(x, "dark_fraction")) == pytest.approx(
        (clot, 0, 0, 0)
    )
    for name in ("ring_mean", "ring_median", "ring_p10", "ring_p90"):
        assert f(x, name) == pytest.approx(brain)
    assert f(x, "contrast_median") == pytest.approx(clot - brain)
    area_px = DISK.sum()
    assert f(x, "area_mm2_largest") == pytest.approx(area_px * 0.25)
    assert f(x, "volume_ml") == pytest.approx(area_px * 0.25 * 5 / 1000)
    assert f(x, "hematoma_slices") == 1
    assert f(x, "circularity_largest") == pytest.approx(1.0, abs=0.1)
    assert f(x, "solidity_largest") == pytest.approx(1.0, abs=0.1)
    assert f(x, "eccentricity_largest") == pytest.approx(0.0, abs=0.05)
    assert f(x, "extent_largest") == pytest.approx(area_px / 21**2)  # in its 21 x 21 pixel bounding box
    # uniform inside: no internal gradient, no vertical contrast, no preferred direction
    assert (f(x, "gradient_mean"), f(x, "bimodality"), f(x, "vertical_contrast")) == pytest.approx((0, 0, 0))
    assert f(x, "gradient_anisotropy") == pytest.approx(1.0)


def test_a_two_layer_disk_shows_its_dependent_layer():
    x = disk_study(layered=True)
    light, clot = to_hu(LIGHT, WINDOW), to_hu(CLOT, WINDOW)
    # the lowest third of the disk's rows is all dense, the top third all light
    assert f(x, "vertical_contrast") == pytest.approx(clot - light)
    assert f(x, "bimodality") == pytest.approx(clot - light)
    assert f(x, "gradient_anisotropy") > 5  # the interface is horizontal: d/drow only
    assert f(x, "gradient_mean") > 0 and f(x, "dark_fraction") == pytest.approx(np.mean(ROWS[DISK] < 32))
    upside_down = study_features(  # the denser layer on top: not what gravity does
        np.flip(disk_image(layered=True), axis=1), np.flip(DISK[None], axis=1).astype(np.uint8), WINDOW, 0.5, 5.0, 10
    )
    assert f(upside_down, "vertical_contrast") == pytest.approx(light - clot)


def test_a_lobulated_margin_lowers_circularity_and_solidity():
    lobes = DISK | ((ROWS - 32) ** 2 + (COLS - 47) ** 2 <= 4**2) | ((ROWS - 17) ** 2 + (COLS - 32) ** 2 <= 4**2)
    img = np.where(HEAD, BRAIN, 0).astype(np.uint8)
    img[lobes] = CLOT
    x = study_features(img[None], lobes[None].astype(np.uint8), WINDOW, 0.5, 5.0, 10)
    disk = disk_study()
    assert f(x, "circularity_largest") < f(disk, "circularity_largest") - 0.1
    assert f(x, "solidity_largest") < f(disk, "solidity_largest") - 0.03


def test_shape_features_average_over_slices_and_the_largest_slice_is_taken():
    small = (ROWS - 32) ** 2 + (COLS - 32) ** 2 <= 5**2
    images = np.stack([disk_image(False)[0]] * 2)
    masks = np.stack([DISK, small]).astype(np.uint8)
    x = study_features(images, masks, WINDOW, 1.0, 5.0, 10)
    assert f(x, "area_mm2_largest") == DISK.sum() and f(x, "hematoma_slices") == 2
    assert f(x, "volume_ml") == pytest.approx((DISK.sum() + small.sum()) * 5 / 1000)


def test_a_study_without_hematoma_has_only_its_volume_and_slice_count():
    masks = np.zeros((2, S, S), np.uint8)
    masks[0, :3, :3] = 1  # 9 pixels: not more than min_pixels = 10
    x = study_features(np.zeros((2, S, S), np.uint8), masks, WINDOW, 1.0, 5.0, 10)
    defined = {n for n, v in zip(FEATURE_NAMES, x) if not np.isnan(v)}
    assert defined == set(DEFINED_WHEN_EMPTY)
    assert f(x, "hematoma_slices") == 0 and f(x, "volume_ml") == pytest.approx(9 * 5 / 1000)


def test_standardisation_from_summed_site_sums_equals_numpy_over_the_pooled_features():
    rng = np.random.default_rng(0)
    sites = [rng.normal(3.0, 2.0, (n, N_FEATURES)) for n in (5, 11, 2)]
    sites[1][[0, 3], 4] = np.nan  # a feature undefined for two studies
    sites[2][:, 7] = 1.5
    sums = [feature_sums(x) for x in sites]
    mean, sd = standardise(*(np.sum([s[i] for s in sums], axis=0) for i in range(3)))
    pooled = np.concatenate(sites)
    assert mean == pytest.approx(np.nanmean(pooled, axis=0))
    assert sd == pytest.approx(np.nanstd(pooled, axis=0))
    Z = standardised(pooled, mean, sd)
    assert not np.isnan(Z).any() and Z[[5, 8], 4] == pytest.approx([0, 0])  # NaN -> the mean
    assert np.nanmean(Z, axis=0) == pytest.approx(np.zeros(N_FEATURES), abs=0.2)
    constant = standardise(*feature_sums(np.ones((4, N_FEATURES))))
    assert constant[1] == pytest.approx(np.ones(N_FEATURES))  # a constant feature standardises to 0
    assert standardise(*feature_sums(np.zeros((0, N_FEATURES))))[0] == pytest.approx(np.zeros(N_FEATURES))


def separable(seed: int = 1, n: int = 60, f_: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, f_))
    direction = np.array([1.0, -2.0, 0.5, 0.0, 1.0])[:f_]
    y = (X @ direction > 0).astype(float)
    return X, np.stack([y, 1 - y], axis=1)  # two "markers": one and its opposite


def test_logistic_steps_separate_separable_data_as_scikit_learn_does():
    from sklearn.linear_model import LogisticRegression

    X, Y = separable()
    Y[3, 1] = np.nan  # a missing label is left out, not a 0
    pw = marker_pos_weight(Y)
    l2 = 0.01
    W = logistic_step(np.zeros((2, X.shape[1] + 1)), X, Y, pw, lr=0.5, l2=l2, steps=3000)
    z = predict_logits(W, X)
    assert auroc(Y[:, 0], z[:, 0]) == 1.0 and auroc(Y[:, 1], z[:, 1]) == 1.0
    for m in range(2):
        known = ~np.isnan(Y[:, m])
        y = Y[known, m]
        ref = LogisticRegression(C=1 / (l2 * known.sum()), max_iter=10000, tol=1e-10)
        ref.fit(X[known], y, sample_weight=np.where(y == 1, pw[m], 1.0))
        w = W[m, :-1]
        cos = w @ ref.coef_[0] / (np.linalg.norm(w) * np.linalg.norm(ref.coef_[0]))
        assert cos > 0.999
        assert W[m, :-1] == pytest.approx(ref.coef_[0], rel=0.02, abs=0.02)  # the same objective, the same optimum
    losses = [weighted_bce(w, X, Y, pw, l2) for w in (np.zeros_like(W), W)]
    assert (losses[1] < losses[0]).all()


def test_a_marker_without_annotations_keeps_its_weights():
    X, Y = separable()
    Y[:, 1] = np.nan
    start = np.full((2, X.shape[1] + 1), 0.3)
    W = logistic_step(start, X, Y, np.ones(2), lr=0.1, l2=0.0, steps=5)
    assert W[1] == pytest.approx(start[1]) and not np.allclose(W[0], start[0])


def test_each_marker_gets_the_candidate_with_the_best_validation_auroc():
    X, Y = separable(n=40)
    good = np.zeros((2, X.shape[1] + 1))
    good[0, :-1] = [1.0, -2.0, 0.5, 0.0, 1.0]
    good[1, :-1] = -good[0, :-1]
    weights = np.stack([-good, good, np.zeros_like(good)])  # K = 3 candidates: wrong, right, flat
    stats = candidate_stats(weights, X, Y)
    assert stats.auroc().shape == (3 * 2,)
    picks = choose(stats, 3)
    assert picks.tolist() == [1, 1]
    assert chosen_weights(weights, picks) == pytest.approx(good)
    assert chosen_stats(stats, picks).auroc() == pytest.approx([1.0, 1.0])
    # no validation positives: the middle candidate
    assert choose(candidate_stats(weights, X, np.zeros_like(Y)), 3).tolist() == [1, 1]


def test_the_model_file_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    model = RadiomicsModel(
        rng.normal(size=N_FEATURES), np.ones(N_FEATURES), rng.normal(size=(4, N_FEATURES + 1)), {"a": 0.1}, {"x": 1}
    )
    back = RadiomicsModel.load(model.save(tmp_path / "radiomics.json"))
    X = rng.normal(size=(3, N_FEATURES))
    assert back.logits(X) == pytest.approx(model.logits(X)) and back.l2 == {"a": 0.1}
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="bad.json: not a hemexp-radiomics"):
        RadiomicsModel.load(tmp_path / "bad.json")
