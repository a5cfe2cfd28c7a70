"""Strategies on hand-built replies, checked numerically against numpy (no network, no Ray).

``StrategyChecks`` holds what every strategy must do; each subclass names one strategy and adds
the check of its own aggregation rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from scipy import stats

from common.records import (
    ARRAYS,
    CONFIG,
    LABEL_NEG,
    LABEL_POS,
    LOCAL_NORM,
    METRICS,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    TRAIN_LOSS,
)
from common.run_config import ROBUST_STRATEGIES, STRATEGY_NAMES
from server.strategies import STRATEGIES, aggregate_metrics, build_strategy
from tests.helpers.flower import FakeGrid, make_reply, set_task_identity, strategy_options

RNG = np.random.default_rng(0)
N_SITES = 5
HEAD_W, HEAD_B = "classifier.head.3.weight", "classifier.head.3.bias"
NORM_KEYS = ("classifier.bn.weight", "classifier.bn.running_mean")
SHAPES = {"classifier.conv.weight": (3, 2, 3, 3), HEAD_W: (4, 6), HEAD_B: (4,)}
#: Per-site arrays, sizes (num-examples) and positives per label.
SITE_ARRAYS = [{k: RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(N_SITES)]
SIZES = [10, 40, 25, 5, 20]
POSITIVES = [[3, 0, 1, 0], [0, 0, 4, 0], [5, 0, 0, 0], [1, 0, 2, 0], [0, 0, 3, 0]]


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def site_replies(extra: dict[str, np.ndarray] | None = None) -> list[Message]:
    out = []
    for i in range(N_SITES):
        arrays = {**SITE_ARRAYS[i], **({k: v[i] for k, v in extra.items()} if extra else {})}
        metrics = {NUM_EXAMPLES: SIZES[i], TRAIN_LOSS: float(i), LABEL_POS: POSITIVES[i], LABEL_NEG: [SIZES[i]] * 4}
        out.append(make_reply(arrays, metrics, node_id=100 + i))
    return out


def stacked(key: str) -> np.ndarray:
    return np.stack([a[key] for a in SITE_ARRAYS])


class StrategyChecks:
    """Checks shared by every strategy; subclasses set ``name`` and check their own rule."""

    name: str
    kwargs: dict = {}

    def strategy(self, **kw):
        return build_strategy(
            strategy_options(name=self.name, **{**self.kwargs, **kw}), local_keys=NORM_KEYS, head_keys=(HEAD_W, HEAD_B)
        )

    def aggregate(self, replies=None, **kw) -> tuple[dict[str, np.ndarray], MetricRecord]:
        strategy = self.strategy(**kw)
        grid = FakeGrid({100 + i: (None, None) for i in range(N_SITES)})
        current = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
        list(strategy.configure_train(1, current, ConfigRecord(), grid))  # FedOpt keeps the current arrays
        arrays, metrics = strategy.aggregate_train(1, site_replies() if replies is None else replies)
        return {k: v.numpy() for k, v in arrays.items()}, metrics

    def test_keys_and_shapes_kept(self):
        arrays, _ = self.aggregate()
        assert {k: v.shape for k, v in arrays.items()} == SHAPES

    def test_counts_summed_and_loss_averaged(self):
        _, metrics = self.aggregate()
        if self.name == "krum":  # Krum keeps the chosen site's metrics
            return
        assert metrics[LABEL_POS] == np.sum(POSITIVES, axis=0).tolist()
        assert metrics[TRAIN_LOSS] == pytest.approx(np.average(np.arange(N_SITES), weights=SIZES))

    def test_error_replies_ignored(self):
        replies = site_replies() + [make_reply(None, {}, node_id=999, error="site-09: train failed (OSError)")]
        with_error, _ = self.aggregate(replies)
        without, _ = self.aggregate()
        for k in SHAPES:
            np.testing.assert_allclose(with_error[k], without[k], rtol=1e-6)

    def test_imbalance_head_rows_weighted_by_positives(self):
        if self.name in ROBUST_STRATEGIES:
            with pytest.raises(ValueError, match="robustness"):
                self.strategy(imbalance_head=True)
            return
        plain, _ = self.aggregate()
        arrays, _ = self.aggregate(imbalance_head=True)
        pos = np.asarray(POSITIVES, dtype=float)
        for key in (HEAD_W, HEAD_B):
            for c in range(4):
                if pos[:, c].sum() > 0:
                    expected = np.average(stacked(key)[:, c], axis=0, weights=pos[:, c])
                else:  # no site has a positive: the base strategy's row
                    expected = plain[key][c]
                np.testing.assert_allclose(arrays[key][c], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arrays["classifier.conv.weight"], plain["classifier.conv.weight"], rtol=1e-6)

    def test_replies_without_label_counts(self):
        """privacy.secure-counts: train replies carry no counts; aggregation is unchanged, and the
        imbalance-aware head (refused by the server config then) falls back to the base aggregate."""
        replies = site_replies()
        for r in replies:
            del r.content[METRICS][LABEL_POS], r.content[METRICS][LABEL_NEG]
        arrays, metrics = self.aggregate(replies)
        plain, _ = self.aggregate()
        assert LABEL_POS not in metrics and LABEL_NEG not in metrics
        for k in SHAPES:
            np.testing.assert_allclose(arrays[k], plain[k], rtol=1e-6)
        if self.name not in ROBUST_STRATEGIES:
            head, _ = self.aggregate(replies, imbalance_head=True)
            for k in SHAPES:
                np.testing.assert_allclose(head[k], plain[k], rtol=1e-6)


class TestFedAvg(StrategyChecks):
    name = "fedavg"

    def test_weighted_by_num_examples(self):
        arrays, _ = self.aggregate()
        for key in SHAPES:
            np.testing.assert_allclose(arrays[key], np.average(stacked(key), axis=0, weights=SIZES), rtol=1e-5)


class TestFedProx(StrategyChecks):
    name = "fedprox"
    kwargs = {"proximal_mu": 0.05}

    def test_sends_mu_and_averages_like_fedavg(self):
        grid = FakeGrid({100: (None, None), 101: (None, None)})
        msgs = list(self.strategy().configure_train(1, ArrayRecord(), ConfigRecord(), grid))
        assert {m.content[CONFIG][PROXIMAL_MU] for m in msgs} == {0.05}
        arrays, _ = self.aggregate()
        np.testing.assert_allclose(arrays[HEAD_W], np.average(stacked(HEAD_W), axis=0, weights=SIZES), rtol=1e-5)


class TestFedMedian(StrategyChecks):
    name = "fedmedian"

    def test_elementwise_median(self):
        arrays, _ = self.aggregate()
        for key in SHAPES:
            np.testing.assert_allclose(arrays[key], np.median(stacked(key), axis=0), rtol=1e-6)


class TestFedTrimmedAvg(StrategyChecks):
    name = "fedtrimmedavg"
    kwargs = {"trim_beta": 0.2}

    def test_trimmed_mean(self):
        arrays, _ = self.aggregate()
        for key in SHAPES:
            np.testing.assert_allclose(arrays[key], stats.trim_mean(stacked(key), 0.2, axis=0), rtol=1e-5)


class TestKrum(StrategyChecks):
    name = "krum"

    def test_picks_the_site_closest_to_the_others(self):
        arrays, _ = self.aggregate()
        flat = np.stack([np.concatenate([a[k].ravel() for k in SHAPES]) for a in SITE_ARRAYS])
        d = ((flat[:, None] - flat[None]) ** 2).sum(-1)
        f = 0
        scores = [np.sort(np.delete(d[i], i))[: N_SITES - f - 2].sum() for i in range(N_SITES)]
        chosen = SITE_ARRAYS[int(np.argmin(scores))]
        for key in SHAPES:
            np.testing.assert_allclose(arrays[key], chosen[key], rtol=1e-6)


class TestFedAdam(StrategyChecks):
    name = "fedadam"
    kwargs = {"server_lr": 0.01, "tau": 1e-3}

    def test_one_adam_step_from_the_average(self):
        arrays, _ = self.aggregate()
        strategy = self.strategy()
        b1, b2, eta, tau = strategy.beta_1, strategy.beta_2, 0.01, 1e-3
        for key in SHAPES:
            delta = np.average(stacked(key), axis=0, weights=SIZES)  # current arrays are zero
            m, v = (1 - b1) * delta, (1 - b2) * delta**2
            eta_norm = eta * math.sqrt(1 - b2**2) / (1 - b1**2)
            np.testing.assert_allclose(arrays[key], eta_norm * m / (np.sqrt(v) + tau), rtol=1e-4, atol=1e-7)


class TestFedYogi(StrategyChecks):
    name = "fedyogi"
    kwargs = {"server_lr": 0.01, "tau": 1e-3}

    def test_moves_toward_the_average(self):
        arrays, _ = self.aggregate()
        for key in SHAPES:
            avg = np.average(stacked(key), axis=0, weights=SIZES)
            assert np.all(np.sign(arrays[key]) == np.sign(avg))
            assert np.all(np.abs(arrays[key]) <= 0.01 / (1 - 0.9**2) + 1e-6)


class TestFedBN(StrategyChecks):
    name = "fedbn"

    def test_norm_keys_never_sent(self):
        current = ArrayRecord({k: Array(np.zeros(2, np.float32)) for k in (*NORM_KEYS, "classifier.conv.weight")})
        grid = FakeGrid({100: (None, None), 101: (None, None)})
        for configure in (self.strategy().configure_train, self.strategy().configure_evaluate):
            for msg in configure(1, current, ConfigRecord(), grid):
                assert set(msg.content[ARRAYS]) == {"classifier.conv.weight"}
                assert msg.content[CONFIG][LOCAL_NORM] is True

    def test_averages_the_rest(self):
        arrays, _ = self.aggregate()
        assert not set(arrays) & set(NORM_KEYS)
        np.testing.assert_allclose(arrays[HEAD_W], np.average(stacked(HEAD_W), axis=0, weights=SIZES), rtol=1e-5)


def test_registry_lists_the_valid_names():
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedadam", "fedyogi", "fedbn", "fedmedian", "fedtrimmedavg", "krum"}
    with pytest.raises(KeyError, match="fedavg.*fedyogi"):
        strategy_options(name="fedsgd")


def test_run_config_names_are_the_registry():
    """``strategy.name`` is checked where the run config is parsed (common), built here (server)."""
    assert set(STRATEGY_NAMES) == set(STRATEGIES) and ROBUST_STRATEGIES < set(STRATEGIES)


def test_metrics_nan_skipped_and_counts_summed():
    records = [
        RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: n, "auc": a, LABEL_POS: [p, 0], LABEL_NEG: [1, 2]})})
        for n, a, p in ((10, 0.8, 1), (30, math.nan, 0), (20, 0.5, 2), (0, 0.1, 5))
    ]
    out = aggregate_metrics(records, NUM_EXAMPLES)
    assert out["auc"] == pytest.approx(np.average([0.8, 0.5], weights=[10, 20]))
    assert out[LABEL_POS] == [8, 0] and out[LABEL_NEG] == [4, 8] and out[NUM_EXAMPLES] == 60
    nan_everywhere = aggregate_metrics(records[1:2], NUM_EXAMPLES)
    assert math.isnan(nan_everywhere["auc"])


def test_every_strategy_declares_its_traits_once():
    """``common.run_config.STRATEGY_TRAITS`` is the one declaration the server, the simulation and
    ``hemexp predict`` ask: it names exactly the strategies the server builds."""
    from common.run_config import NOT_A_PLAIN_MEAN, ROBUST_STRATEGIES, STRATEGY_TRAITS, strategy_traits
    from server.strategies import STRATEGIES

    assert set(STRATEGY_TRAITS) == set(STRATEGIES)
    assert {n for n, t in STRATEGY_TRAITS.items() if t.site_norms} == {"fedbn"}
    assert ROBUST_STRATEGIES == {"fedmedian", "fedtrimmedavg", "krum"} <= set(NOT_A_PLAIN_MEAN)
    assert strategy_traits(None) == strategy_traits("no-such") == STRATEGY_TRAITS["fedavg"]
