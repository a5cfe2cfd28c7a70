"""The radiomics federation (``radiomics.rounds`` > 0) driven through a FakeGrid: the real ServerApp
schedule (``server.radiomics``) and the real ClientApp handlers at three tiny sites.

What crosses (feature sums, weights, the deep evaluate reply's aggregates: never a study's features
or score), the global standardisation from the summed sums, FedAvg of the weights by training
studies, the L2 choice and the model file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from client.client_app import app as client_app
from client.data.dataset import SliceDataset, split_slices
from client.radiomics import reference_features
from common.checkpoint import save_checkpoint
from common.config import MARKERS
from common.model import build_joint_model
from common.radiomics import MODEL_FILE, N_FEATURES, RadiomicsModel
from common.records import (
    ARRAYS,
    CONFIG,
    FEATURE_MEAN,
    FEATURE_SD,
    METRICS,
    NUM_EXAMPLES,
    RADIOMICS_STAGE,
    RADIOMICS_WEIGHTS,
    SERVER_ROUND,
    SITE,
)
from common.run_config import parse_run_config
from server.radiomics import run_radiomics_federation
from server.validation import (
    RADIOMICS_EVALUATE_TYPE,
    RADIOMICS_STATS_TYPE,
    RADIOMICS_TRAIN_TYPE,
    evaluate_metric_rules,
)
from simulations.sites import prepare_caches
from tests.helpers.flower import run_config, set_task_identity, site_grid, tiny_run_config, write_prepared_sites

N_SITES = 3
ROUNDS = 3
L2 = (0.01, 1.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def config(data_root: Path, out: Path, checkpoint: Path) -> dict:
    return tiny_run_config(
        data_root,
        out,
        **{
            "radiomics.rounds": ROUNDS,
            "radiomics.local-steps": 4,
            "radiomics.l2": " ".join(str(v) for v in L2),
            "train.init-checkpoint": str(checkpoint),
        },
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    set_task_identity()
    root = tmp_path_factory.mktemp("radiomics")
    base = tiny_run_config(root / "data", root / "runs")
    write_prepared_sites(root / "data", N_SITES, base)
    model_cfg, pre = parse_run_config(base).architecture()
    ckpt = save_checkpoint(root / "unet.pt", build_joint_model(model_cfg, seed=3), model_cfg, pre)
    rc = config(root / "data", root / "runs", ckpt)
    grid = site_grid(client_app, rc, N_SITES)
    history = run_radiomics_federation(grid, rc)
    return {"grid": grid, "history": history, "out": root / "runs" / "run", "rc": rc, "data": root / "data"}


def deliveries(run, message_type: str, server_round: int | None = None):
    return [
        s
        for s in run["grid"].log
        if s.message.metadata.message_type == message_type
        and (server_round is None or s.message.content[CONFIG][SERVER_ROUND] == server_round)
    ]


def pooled_training_features(run) -> np.ndarray:
    """Every site's training features as the sites compute them, pooled here (the test holds all data)."""
    cfg = parse_run_config(run["rc"])
    caches, _ = prepare_caches(run["data"], cfg.architecture()[1], progress=False)
    parts = []
    for cache in caches.values():
        train = SliceDataset(cache, split_slices(cache, cfg.data.split, seed=cfg.seed)["train"])
        parts.append(reference_features(train).annotated().features)
    return np.concatenate(parts)


def test_the_schedule_and_its_history(run):
    rounds = run["history"].rounds
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert {r["stage"] for r in rounds} == {RADIOMICS_STAGE}
    assert rounds[0]["radiomics-stats"]["sites"] == N_SITES
    assert all(r["train"]["received"] == N_SITES and not r["failures"] and not r["rejected"] for r in rounds)
    last = rounds[-1]
    assert set(last["evaluate"]["sites"]) == {f"site-{i + 1:02d}" for i in range(N_SITES)}
    assert set(last["radiomics-selection"]["l2"]) == set(MARKERS)
    assert set(last["radiomics-selection"]["l2"].values()) <= set(L2)
    saved = json.loads((run["out"] / "history.json").read_text())
    assert len(saved["rounds"]) == ROUNDS and all(r["bytes"] for r in saved["rounds"])
    model = RadiomicsModel.load(run["out"] / MODEL_FILE)
    assert model.weights.shape == (len(MARKERS), N_FEATURES + 1)
    assert model.l2 == last["radiomics-selection"]["l2"]
    assert set(model.meta["thresholds"]) == set(MARKERS) and "validation" in model.meta


def test_only_sums_weights_and_aggregates_cross(run):
    stats = deliveries(run, RADIOMICS_STATS_TYPE)
    assert len(stats) == N_SITES
    for s in stats:
        assert set(s.reply.content.keys()) == {METRICS, SITE}
        lengths = {k: len(v) if isinstance(v, list) else None for k, v in s.reply.content[METRICS].items()}
        assert lengths == {
            NUM_EXAMPLES: None,
            "feature-n": N_FEATURES,
            "feature-sum": N_FEATURES,
            "feature-sumsq": N_FEATURES,
            "label-pos": len(MARKERS),
            "label-neg": len(MARKERS),
        }
    for s in deliveries(run, RADIOMICS_TRAIN_TYPE):
        assert set(s.reply.content.keys()) == {ARRAYS, METRICS, SITE}
        assert {k: tuple(a.shape) for k, a in s.reply.content[ARRAYS].items()} == {
            RADIOMICS_WEIGHTS: (len(L2), len(MARKERS), N_FEATURES + 1)
        }
        assert all(not isinstance(v, list) for v in s.reply.content[METRICS].values())
    evaluated = deliveries(run, RADIOMICS_EVALUATE_TYPE)
    assert len(evaluated) == 2 * N_SITES  # "select", then "score"
    allowed = set(evaluate_metric_rules(MARKERS))
    for s in evaluated:
        assert set(s.reply.content.keys()) == {METRICS, SITE}
        keys = set(s.reply.content[METRICS])
        assert keys <= allowed or all(k == NUM_EXAMPLES or k.startswith("candidates/") for k in keys)
    # the global U-Net went to each site once, with its first evaluate message
    with_unet = [s for s in evaluated if "frozen-unet" in s.message.content]
    assert len(with_unet) == N_SITES


def test_the_global_standardisation_is_numpys_over_the_pooled_training_features(run):
    (first,) = {tuple(s.message.content[CONFIG][FEATURE_MEAN]) for s in deliveries(run, RADIOMICS_TRAIN_TYPE, 1)}
    sd = deliveries(run, RADIOMICS_TRAIN_TYPE, 1)[0].message.content[CONFIG][FEATURE_SD]
    pooled = pooled_training_features(run)
    assert len(pooled) == run["history"].rounds[0]["radiomics-stats"]["studies"]
    expected_sd = np.nanstd(pooled, axis=0)
    assert np.asarray(first) == pytest.approx(np.nan_to_num(np.nanmean(pooled, axis=0)), abs=1e-9)
    assert np.asarray(sd) == pytest.approx(np.where(expected_sd > 1e-9, expected_sd, 1.0), rel=1e-6, abs=1e-9)


def test_fedavg_weights_the_sites_by_their_training_studies(run):
    replies = [s.reply for s in deliveries(run, RADIOMICS_TRAIN_TYPE, 1)]
    n = np.array([r.content[METRICS][NUM_EXAMPLES] for r in replies], dtype=float)
    W = np.stack([r.content[ARRAYS][RADIOMICS_WEIGHTS].numpy() for r in replies])
    expected = np.tensordot(n / n.sum(), W, axes=1)
    sent: ArrayRecord = deliveries(run, RADIOMICS_TRAIN_TYPE, 2)[0].message.content[ARRAYS]
    assert sent[RADIOMICS_WEIGHTS].numpy() == pytest.approx(expected)
    assert not np.allclose(expected, 0)  # the sites did learn


def test_a_radiomics_run_needs_a_u_net_and_no_privacy_option_it_would_break():
    with pytest.raises(ValueError, match="train.init-checkpoint"):
        run_radiomics_federation(site_grid(client_app, {}, 1), run_config(**{"radiomics.rounds": 2}))
    with pytest.raises(ValueError, match="privacy.secure-counts"):
        parse_run_config(
            run_config(**{"radiomics.rounds": 2, "train.init-checkpoint": "x.pt", "privacy.secure-counts": True})
        )
    with pytest.raises(ValueError, match="radiomics.l2"):
        parse_run_config(run_config(**{"radiomics.l2": "0.1 -1"}))
    assert parse_run_config(run_config(**{"radiomics.l2": "0.1, 1"})).radiomics.l2_values == (0.1, 1.0)
