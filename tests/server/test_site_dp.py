"""Site-level DP (``privacy.site-dp``): Flower's fixed-clipping wrappers, checked against numpy.

Unit checks on tiny hand-built replies: the clipped mean (every site weighted equally, its update
scaled to norm C when above it), the noise's spread (Flower's sigma C / n), the site's own clipping by
Flower's mod, and the refused run configs. Two rounds through the real Federation loop (fake sites,
no training) show a site's update clipped by the server in stage 1 and by the sites in stage 2.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from client.federation.site_clipping import site_clipping_mod
from common.model import half_state_dict
from common.records import (
    ARRAYS,
    CONFIG,
    FROZEN_UNET,
    LABEL_NEG,
    LABEL_POS,
    METRICS,
    NUM_EXAMPLES,
    SITE,
    SITE_ID,
    STEPS,
    TRAIN_LOSS,
)
from common.run_config import PrivacyOptions, parse_run_config
from server.federation import Federation
from server.server_config import ServerRunConfig
from server.site_dp import ClientSideSiteDP, ServerSideSiteDP, with_site_dp
from server.strategies import build_strategy
from tests.helpers.flower import (
    FakeGrid,
    make_context,
    make_message,
    make_reply,
    run_config,
    set_task_identity,
    strategy_options,
)

RNG = np.random.default_rng(3)
SHAPES = {"w": (3, 4), "b": (4,)}
SIZES = [10, 40, 25]  # num-examples: a weighted mean would differ from the plain one checked
CLIP = 1.0


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def privacy(**fields: Any) -> PrivacyOptions:
    """The default run config's ``privacy.*`` with ``fields`` changed (and checked again)."""
    return replace(parse_run_config(run_config()).privacy, **fields)


def wrapped(mode: str, sigma: float = 0.0, clip: float = CLIP, name: str = "fedavg", local_keys: tuple = ()):
    inner = build_strategy(strategy_options(name=name), local_keys=local_keys)
    return with_site_dp(inner, privacy(site_dp=mode, site_noise_multiplier=sigma, site_clipping_norm=clip))


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()})


def norm(update: dict[str, np.ndarray]) -> float:
    """L2 norm of a whole update, all arrays flattened together."""
    return float(np.linalg.norm(np.concatenate([np.ravel(v).astype(np.float64) for v in update.values()])))


def scaled(direction: dict[str, np.ndarray], to_norm: float) -> dict[str, np.ndarray]:
    return {k: v * (to_norm / norm(direction)) for k, v in direction.items()}


def random_update(to_norm: float, shapes: dict[str, tuple] = SHAPES) -> dict[str, np.ndarray]:
    return scaled({k: RNG.normal(size=s) for k, s in shapes.items()}, to_norm)


def site_reply(node: int, current: dict[str, np.ndarray], update: dict[str, np.ndarray], size: int) -> Message:
    """A train reply of ``current + update``, its arrays in ``update``'s key order."""
    arrays = {k: (current[k] + update[k]).astype(np.float32) for k in update}
    return make_reply(arrays, {NUM_EXAMPLES: size, TRAIN_LOSS: 0.5}, node_id=node)


def one_round(strategy, current: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], sizes=SIZES):
    """configure_train then aggregate_train over one reply per update; the aggregate as numpy, its metrics,
    and the train messages sent."""
    grid = FakeGrid({100 + i: (None, None) for i in range(len(updates))})
    messages = list(strategy.configure_train(1, record(current), ConfigRecord(), grid))
    replies = [site_reply(100 + i, current, u, s) for i, (u, s) in enumerate(zip(updates, sizes))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}, metrics, messages


def clipped_mean(updates: list[dict[str, np.ndarray]], clip: float) -> dict[str, np.ndarray]:
    """The plain mean of the updates, each first scaled to norm ``clip`` when above it."""
    factors = [min(1.0, clip / norm(u)) for u in updates]
    return {k: np.mean([f * u[k] for f, u in zip(factors, updates)], axis=0) for k in updates[0]}


# --- the server clips -------------------------------------------------------------------------


def test_server_clips_each_update_to_the_norm_and_averages_sites_equally():
    current = {k: RNG.normal(size=s) for k, s in SHAPES.items()}
    updates = [random_update(0.4), random_update(5.0), random_update(2.5)]
    updates[2] = dict(reversed(updates[2].items()))  # a site's own key order: clipped key by key all the same
    arrays, metrics, _ = one_round(wrapped("server-fixed"), current, updates)
    expected = clipped_mean(updates, CLIP)
    assert set(arrays) == set(SHAPES)
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k], current[k] + expected[k], rtol=1e-5, atol=1e-6)
    assert metrics[NUM_EXAMPLES] == sum(SIZES)  # what the sites trained on, though each weighed 1


def test_updates_above_the_norm_leave_exactly_the_norm():
    """Three sites push the same direction by 3, 5 and 9: each is scaled to C, so their mean moves by C."""
    current = {k: RNG.normal(size=s) for k, s in SHAPES.items()}
    direction = random_update(1.0)
    arrays, _, _ = one_round(wrapped("server-fixed"), current, [scaled(direction, n) for n in (3.0, 5.0, 9.0)])
    moved = {k: arrays[k].astype(np.float64) - current[k].astype(np.float32) for k in SHAPES}
    assert norm(moved) == pytest.approx(CLIP, rel=1e-5)
    for k in SHAPES:
        np.testing.assert_allclose(moved[k], direction[k] * CLIP, rtol=1e-4, atol=1e-6)


def test_fedbn_clips_against_the_shared_arrays_only():
    """FedBN sends no norm keys: the update is measured on what the sites received and came back."""
    current = {k: RNG.normal(size=s) for k, s in {**SHAPES, "gn.weight": (4,)}.items()}
    updates = [random_update(0.5), random_update(4.0), random_update(3.0)]
    arrays, _, messages = one_round(wrapped("server-fixed", name="fedbn", local_keys=("gn.weight",)), current, updates)
    assert set(messages[0].content[ARRAYS].keys()) == set(arrays) == set(SHAPES)
    expected = clipped_mean(updates, CLIP)
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k], current[k] + expected[k], rtol=1e-5, atol=1e-6)


def test_noise_has_flowers_std_sigma_c_over_n_and_comes_from_entropy():
    sigma, clip, n = 2.0, 0.5, 4
    shapes = {"w": (200, 200)}
    current = {"w": RNG.normal(size=shapes["w"])}
    updates = [random_update(0.3, shapes) for _ in range(n)]  # within C: the clipped mean is the mean
    expected = current["w"].astype(np.float32) + np.mean([u["w"] for u in updates], axis=0)
    noises = []
    for _ in range(2):
        np.random.seed(0)  # a public seed: the noise must not follow it
        arrays, _, _ = one_round(wrapped("server-fixed", sigma, clip), current, updates, sizes=[5, 10, 20, 40])
        noises.append(arrays["w"].astype(np.float64) - expected)
        assert np.random.random() == np.random.RandomState(0).random_sample()  # the server's own stream untouched
    std = sigma * clip / n  # Flower's compute_stdv
    for noise in noises:
        assert noise.std() == pytest.approx(std, rel=0.03)  # 40,000 draws: the sample std is within 0.4 % (1 SE)
        assert abs(noise.mean()) < 5 * std / np.sqrt(noise.size)
    assert np.corrcoef(noises[0].ravel(), noises[1].ravel())[0, 1] < 0.05


def test_integer_arrays_are_refused():
    grid = FakeGrid({100: (None, None), 101: (None, None)})
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32)), "bn.num_batches_tracked": Array(np.zeros(1, np.int64))})
    with pytest.raises(ValueError, match=r"privacy.site-dp .*\['bn.num_batches_tracked'\] are not floating point"):
        wrapped("server-fixed").configure_train(1, arrays, ConfigRecord(), grid)


def test_wrapper_keeps_the_strategy_min_train_nodes_and_off_keeps_the_strategy():
    inner = build_strategy(strategy_options(min_train_nodes=3))
    assert with_site_dp(inner, privacy(site_dp="server-fixed")).min_train_nodes == 3
    assert with_site_dp(inner, privacy()) is inner


# --- the sites clip ---------------------------------------------------------------------------


def test_client_side_sends_c_and_leaves_out_an_unclipped_update(caplog):
    current = {k: RNG.normal(size=s) for k, s in SHAPES.items()}
    updates = [random_update(0.5), random_update(1.0), random_update(3.0)]  # the last site did not clip
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics, messages = one_round(wrapped("client-fixed"), current, updates)
    assert all(m.content[CONFIG]["clipping_norm"] == CLIP for m in messages)
    expected = clipped_mean(updates[:2], CLIP)
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k], current[k] + expected[k], rtol=1e-5, atol=1e-6)
    assert metrics[NUM_EXAMPLES] == sum(SIZES[:2])
    assert "node 102 sent an update of norm 3 > privacy.site-clipping-norm 1" in caplog.text


def train_message(current: dict[str, np.ndarray], config: dict[str, Any]) -> Message:
    """A stage-2 train message: the classifier to train, the frozen U-Net beside it, and the config."""
    content = RecordDict(
        {ARRAYS: record(current), FROZEN_UNET: record({"unet.w": np.ones(5)}), CONFIG: ConfigRecord(config)}
    )
    return make_message(content, MessageType.TRAIN)


def handler_adding(update: dict[str, np.ndarray], seen: list[Message]):
    """A site's train handler: replies with the arrays it received plus ``update``; keeps what it got."""

    def handle(msg: Message, context) -> Message:
        seen.append(msg)
        arrays = {k: v.numpy() + update[k].astype(np.float32) for k, v in msg.content[ARRAYS].items()}
        return Message(RecordDict({ARRAYS: record(arrays), METRICS: MetricRecord({NUM_EXAMPLES: 3})}), reply_to=msg)

    return handle


@pytest.mark.parametrize("mode, moved_norm", [("client-fixed", CLIP), ("off", 4.0), ("server-fixed", 4.0)])
def test_site_mod_clips_the_reply_only_when_the_run_asks(mode, moved_norm):
    current = {k: RNG.normal(size=s) for k, s in SHAPES.items()}
    update, seen = random_update(4.0), []
    context = make_context({}, {"privacy.site-dp": mode})
    reply = site_clipping_mod(train_message(current, {"clipping_norm": CLIP}), context, handler_adding(update, seen))
    moved = {k: v.numpy().astype(np.float64) - current[k].astype(np.float32) for k, v in reply.content[ARRAYS].items()}
    assert norm(moved) == pytest.approx(moved_norm, rel=1e-5)
    for k in SHAPES:  # clipping scales, never turns
        np.testing.assert_allclose(moved[k], update[k] * moved_norm / 4.0, rtol=1e-4, atol=1e-6)
    assert FROZEN_UNET in seen[0].content  # the handler still gets the frozen U-Net


def test_site_mod_refuses_a_train_message_without_the_bound():
    context = make_context({}, {"privacy.site-dp": "client-fixed"})
    msg = train_message({"w": np.zeros(3)}, {})
    reply = site_clipping_mod(msg, context, handler_adding({"w": np.ones(3)}, []))
    assert reply.has_error() and "requires the key 'clipping_norm'" in reply.error.reason


# --- the run config ---------------------------------------------------------------------------


def test_keys_parse_with_their_defaults_and_overrides():
    default = privacy()
    assert (default.site_dp, default.site_noise_multiplier, default.site_clipping_norm) == ("off", 1.0, 1.0)
    rc = run_config(
        **{"privacy.site-dp": "client-fixed", "privacy.site-noise-multiplier": 0.7, "privacy.site-clipping-norm": 3}
    )
    cfg = parse_run_config(rc)
    assert (cfg.privacy.site_dp, cfg.privacy.site_noise_multiplier, cfg.privacy.site_clipping_norm) == (
        "client-fixed",
        0.7,
        3.0,
    )
    assert cfg.architecture()[0].norm == "group"  # BatchNorm's statistics are not clipped or noised
    assert parse_run_config(run_config()).architecture()[0].norm == "batch"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"privacy.site-dp": "on"}, r"privacy.site-dp must be one of \['off', 'server-fixed', 'client-fixed'\]"),
        ({"privacy.site-noise-multiplier": -0.5}, r"privacy.site-noise-multiplier must be >= 0 .* got -0.5 and"),
        ({"privacy.site-clipping-norm": 0.0}, r"privacy.site-clipping-norm > 0, got 1.0 and 0.0"),
    ],
)
def test_bad_values_name_their_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        parse_run_config(run_config(**overrides))


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
@pytest.mark.parametrize(
    "overrides, other",
    [
        ({"privacy.secure-updates": True}, "privacy.secure-updates"),
        ({"strategy.name": "krum"}, "strategy.name 'krum': a median, trimmed mean or Krum's pick"),
        ({"strategy.name": "fedmedian"}, "strategy.name 'fedmedian'"),
        ({"strategy.name": "fedtrimmedavg"}, "strategy.name 'fedtrimmedavg'"),
        (
            {"strategy.name": "fedadam"},
            "strategy.name 'fedadam': Flower adds the noise after the server optimiser's step",
        ),
        ({"strategy.name": "fedyogi"}, "strategy.name 'fedyogi'"),
        ({"strategy.imbalance-head": True}, "strategy.imbalance-head"),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_both_keys(mode, overrides, other):
    with pytest.raises(
        ValueError, match=f"privacy.site-dp '{mode}' cannot be used with {other}.*; switch one of the two off$"
    ):
        parse_run_config(run_config(**{"privacy.site-dp": mode, **overrides}))


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedbn"])
def test_mean_based_strategies_are_accepted(name):
    assert (
        parse_run_config(run_config(**{"privacy.site-dp": "server-fixed", "strategy.name": name})).strategy.name == name
    )


# --- through the Federation's own round loop ----------------------------------------------------

EXAMPLES = {100: 20, 101: 30, 102: 40}


def fake_site(node: int, update_norm: float, n_labels: int, clips: bool):
    """A site that moves every float it is sent by the same amount, its whole update of norm
    ``update_norm``; ``clips``: behind Flower's mod (``client.client_app``'s mods), as a real site."""
    site, counts = {SITE_ID: f"site-{node}"}, {LABEL_POS: [1] * n_labels, LABEL_NEG: [2] * n_labels}

    def handle(msg: Message, context) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:  # hello and the counts round
            content = {METRICS: MetricRecord({NUM_EXAMPLES: 100, **counts}), SITE: ConfigRecord(site)}
            return Message(RecordDict(content), reply_to=msg)
        sent = {k: a.numpy() for k, a in msg.content[ARRAYS].items()}
        shift = update_norm / np.sqrt(sum(v.size for v in sent.values()))
        metrics = MetricRecord({NUM_EXAMPLES: EXAMPLES[node], TRAIN_LOSS: 0.5, STEPS: 1, **counts})
        content = {ARRAYS: record({k: v + shift for k, v in sent.items()}), METRICS: metrics, SITE: ConfigRecord(site)}
        return Message(RecordDict(content), reply_to=msg)

    return (lambda msg, ctx: site_clipping_mod(msg, ctx, handle)) if clips else handle


def federation(tmp_path, mode: str, sites: dict[int, tuple[float, bool]]) -> Federation:
    """A Federation over fake sites ``node -> (update norm, behind the mod)``, site-level DP at C = 1, no noise."""
    rc = run_config(
        **{
            "output.dir": str(tmp_path),
            "output.name": "run",
            "model.image-size": 32,
            "rounds.stage1": 1,
            "rounds.stage2": 1,
            "privacy.site-dp": mode,
            "privacy.site-noise-multiplier": 0.0,
            "privacy.site-clipping-norm": CLIP,
        }
    )
    cfg = ServerRunConfig.from_run_config(rc)
    n_labels = len(cfg.model.output_names)
    nodes = {
        n: (fake_site(n, size, n_labels, clips), make_context({}, rc, node_id=n)) for n, (size, clips) in sites.items()
    }
    return Federation(FakeGrid(nodes), cfg)


def round_shift(fed: Federation, rnd: int, stage: int, half: str) -> tuple[float, float, dict]:
    """One real train round: (how far each float moved, the whole half's float count, the round's record)."""
    before = half_state_dict(fed.model, half)
    entry: dict[str, Any] = {"round": rnd, "stage": stage, "failures": [], "rejected": []}
    out = fed.train_round(rnd, stage, entry)
    assert not entry.get("skipped") and entry["rejected"] == []
    after = half_state_dict(fed.model, half)
    shifts = np.concatenate([(after[k] - v).numpy().ravel() for k, v in before.items()])
    return float(np.median(shifts)), float(np.ptp(shifts)), out


@pytest.mark.usefixtures("one_torch_thread")
def test_federation_server_clips_a_sites_update_in_a_real_round(tmp_path):
    """Stage 1: site 100 moves the U-Net by norm 0.5, site 101 by 3 (clipped to C = 1): each float moves
    by the plain mean of the two, (0.5 + 1) / 2 / sqrt(floats); unclipped or weighted by num-examples it would not."""
    fed = federation(tmp_path, "server-fixed", {100: (0.5, False), 101: (3.0, False)})
    assert isinstance(fed.strategies[1], ServerSideSiteDP)
    floats = sum(v.numel() for v in half_state_dict(fed.model, "unet").values())
    shift, spread, out = round_shift(fed, 1, 1, "unet")
    expected = (0.5 + CLIP) / 2 / np.sqrt(floats)
    assert shift == pytest.approx(expected, rel=1e-3) and spread < 1e-2 * expected  # every float alike
    assert out["aggregated"][NUM_EXAMPLES] == 50 and out["sent"] == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_federation_sites_clip_their_own_update_in_stage_2(tmp_path):
    """Stage 2 (the frozen U-Net beside the classifier in the message): sites 100 and 101 clip behind
    Flower's mod (0.5 stays, 3 becomes C = 1); site 102 has no mod and its update of 3 is left out."""
    fed = federation(tmp_path, "client-fixed", {100: (0.5, True), 101: (3.0, True), 102: (3.0, False)})
    assert isinstance(fed.strategies[2], ClientSideSiteDP)
    floats = sum(v.numel() for v in half_state_dict(fed.model, "classifier").values())
    shift, spread, out = round_shift(fed, 2, 2, "classifier")
    expected = (0.5 + CLIP) / 2 / np.sqrt(floats)
    assert shift == pytest.approx(expected, rel=1e-3) and spread < 1e-2 * expected
    assert out["aggregated"][NUM_EXAMPLES] == 50 and set(out["sites"]) == {"site-100", "site-101", "site-102"}
