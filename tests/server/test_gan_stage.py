"""The federated GAN stage (``rounds.gan``, docs/gan.md design (i)) driven through a FakeGrid: the
real ServerApp and ClientApp handlers, three tiny sites, one of which has no hypodensity-positive
crop and sits every GAN round out.

What crosses in a GAN round (G and D arrays and scalars only), FedAvg of the G and D by crops, a
failed site, checkpoints and resume, the bytes in the history, and stage 2 sampling from the
final global generator.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from client.client_app import app as client_app
from common.checkpoint import load_checkpoint
from common.gan import build_gan, gan_state_dict, get_gan_preset
from common.records import (
    ARRAYS,
    CONFIG,
    GAN_DIGEST,
    GAN_G_PREFIX,
    GAN_GENERATOR,
    GAN_STAGE,
    LOCAL_STEPS,
    METRICS,
    NUM_EXAMPLES,
    RUN_NAME,
    SERVER_ROUND,
    SITE,
    STAGE,
    arrays_digest,
)
from common.run_config import model_from_run_config
from server.checkpoints import round_checkpoint_path, round_checkpoints
from server.federation import run_federation
from server.validation import gan_metric_rules
from simulations.sites import prepare_caches
from tests.helpers.data import write_site
from tests.helpers.flower import FakeGrid, set_task_identity, site_grid, tiny_run_config

N_SITES = 3
GAN_TYPE = f"{MessageType.TRAIN}.gan"
#: site-03's studies: no hypodensity anywhere, so no positive crop and no conditional GAN to train.
NO_HYPODENSITY = [["0", "0", "", "0", ""]] * 6

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def config(data_root: Path, out: Path, **overrides) -> dict:
    """1 stage-1 round, 2 GAN rounds (2 and 3) of 2 local steps, 2 stage-2 rounds (4 and 5)."""
    return tiny_run_config(
        data_root,
        out,
        **{
            "rounds.gan": 2,
            "rounds.stage2": 2,
            "gan.augment-ratio": 0.5,
            "gan.local-steps": 2,
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fedgan") / "data"
    for i in range(N_SITES):
        labels = NO_HYPODENSITY if i == 2 else None  # the others: hypodensity in every other study
        write_site(root / f"site-{i + 1:02d}", n_studies=6, shape=(4, 40, 40), labels=labels, seed=10 * i)
    prepare_caches(root, model_from_run_config(config(root, root.parent))[1], progress=False)
    return root


def make_grid(rc: dict) -> FakeGrid:
    return site_grid(client_app, rc, N_SITES)


@pytest.fixture(scope="module")
def gan_run(data_root, tmp_path_factory):
    set_task_identity()
    out = tmp_path_factory.mktemp("runs")
    rc = config(data_root, out)
    grid = make_grid(rc)
    history = run_federation(grid, rc)
    return {"grid": grid, "history": history, "out": out / "run", "rc": rc}


def gan_deliveries(grid: FakeGrid, server_round: int | None = None):
    return [
        s
        for s in grid.log
        if s.message.metadata.message_type == GAN_TYPE
        and (server_round is None or s.message.content[CONFIG][SERVER_ROUND] == server_round)
    ]


def reference_state() -> dict[str, torch.Tensor]:
    """G and D of the run's preset as build_gan makes them: the only arrays a GAN round may carry."""
    return gan_state_dict(*build_gan(get_gan_preset("tiny"), seed=0))


def same(a, b) -> bool:
    """Equal values; a scalar buffer travels as shape (1,) and comes back as ()."""
    return np.array_equal(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1))


def test_a_gan_round_carries_only_g_and_d_arrays_and_scalars(gan_run):
    expected = {k: tuple(v.shape) or (1,) for k, v in reference_state().items()}  # scalars travel as (1,)
    sent = gan_deliveries(gan_run["grid"])
    assert len(sent) == 2 * N_SITES
    for s in sent:
        msg, reply = s.message, s.reply
        assert set(msg.content.keys()) == {ARRAYS, CONFIG}
        assert {k: tuple(a.shape) for k, a in msg.content[ARRAYS].items()} == expected
        config = dict(msg.content[CONFIG])
        assert set(config) == {SERVER_ROUND, STAGE, LOCAL_STEPS, RUN_NAME}
        assert config[STAGE] == GAN_STAGE and config[LOCAL_STEPS] == 2
        assert set(reply.content.keys()) == {ARRAYS, METRICS, SITE}
        assert {k: tuple(a.shape) for k, a in reply.content[ARRAYS].items()} == expected
        assert set(reply.content[METRICS]) == set(gan_metric_rules())
        assert all(isinstance(v, (int, float)) for v in reply.content[METRICS].values())
    # nothing of the GAN reaches an evaluate message or a stage-1 train message
    others = [s for s in gan_run["grid"].log if s.message.metadata.message_type != GAN_TYPE]
    arrays = [s.message.content[ARRAYS] for s in others if ARRAYS in s.message.content]
    assert arrays and not any(k.startswith("gan.") for a in arrays for k in a)


def test_the_gan_stage_is_fedavg_of_g_and_d_weighted_by_crops(gan_run):
    """Round 2's aggregate (in its checkpoint) = the crops-weighted mean of the two replies that
    trained, computed here in numpy; the site without positive crops replied 0 and is left out."""
    replies = [s.reply for s in gan_deliveries(gan_run["grid"], 2)]
    crops = {r.content[SITE]["site-id"]: r.content[METRICS][NUM_EXAMPLES] for r in replies}
    assert crops["site-03"] == 0 and crops["site-01"] > 0 and crops["site-02"] > 0
    used = [r for r in replies if r.content[METRICS][NUM_EXAMPLES] > 0]
    w = np.array([r.content[METRICS][NUM_EXAMPLES] for r in used], dtype=np.float64)
    saved = load_checkpoint(round_checkpoint_path(gan_run["out"], 2)).gan
    assert set(saved) == set(reference_state())
    for key, value in saved.items():
        mean = sum(wi * r.content[ARRAYS][key].numpy().astype(np.float64) for wi, r in zip(w, used)) / w.sum()
        if key.endswith(("._u", "._v")):  # power-iteration vectors go back to unit length
            mean = mean / np.linalg.norm(mean)
        if not value.is_floating_point():  # batch norm's step counters: rounded, not truncated
            mean = np.round(mean)
        np.testing.assert_allclose(value.numpy().astype(np.float64), mean, rtol=1e-5, atol=1e-6, err_msg=key)
    # round 3 starts from that aggregate
    for s in gan_deliveries(gan_run["grid"], 3):
        assert all(same(s.message.content[ARRAYS][k].numpy(), saved[k]) for k in saved)


def test_history_names_the_gan_rounds_with_their_bytes_and_seconds(gan_run):
    rounds = json.loads((gan_run["out"] / "history.json").read_text())["rounds"]
    assert [r["stage"] for r in rounds] == [1, GAN_STAGE, GAN_STAGE, 2, 2]
    payload = sum(v.numel() * v.element_size() for v in reference_state().values())
    for r in rounds:
        assert r["seconds"] > 0 and set(r["bytes"]) == {"site-01", "site-02", "site-03"}
        assert all(b["sent"] > 0 and b["received"] > 0 for b in r["bytes"].values())
    for r in rounds[1:3]:
        assert r["train"]["received"] == N_SITES and r["evaluate"] == {}
        assert sorted(r["train"]["sites"]) == ["site-01", "site-02", "site-03"]
        sites = r["train"]["sites"]
        assert r["train"]["aggregated"]["num-examples"] == sum(m["num-examples"] for m in sites.values())
        assert sites["site-03"]["num-examples"] == 0 and sites["site-03"]["gan-d-loss"] is None  # NaN -> null
        for b in r["bytes"].values():  # G + D each way, plus ids, keys and the array headers
            assert payload < b["sent"] < 1.2 * payload and payload < b["received"] < 1.2 * payload


def test_stage2_samples_from_the_final_global_generator_sent_once(gan_run):
    """Each site gets the generator of the last GAN round once (its first stage-2 message), keeps it
    under its digest, and never trains a generator of its own; no checkpoint after the GAN stage
    (so neither global.pt nor best.pt) holds G or D."""
    out = gan_run["out"]
    final = load_checkpoint(round_checkpoint_path(out, 3)).gan
    generator = {k[len(GAN_G_PREFIX) :]: v for k, v in final.items() if k.startswith(GAN_G_PREFIX)}
    stage2 = [s for s in gan_run["grid"].log if s.message.metadata.message_type == MessageType.TRAIN]
    stage2 = [s for s in stage2 if s.message.content[CONFIG][STAGE] == 2]
    assert len(stage2) == 2 * N_SITES
    digests = {s.message.content[CONFIG][GAN_DIGEST] for s in stage2}
    carried = [s for s in stage2 if GAN_GENERATOR in s.message.content]
    assert sorted(s.message.content[CONFIG][SERVER_ROUND] for s in carried) == [4] * N_SITES
    record = carried[0].message.content[GAN_GENERATOR]
    assert set(record) == {GAN_G_PREFIX + k for k in generator} and arrays_digest(record) in digests
    (digest,) = digests
    for i in range(N_SITES):
        store = Path(gan_run["rc"]["data.root"]) / ".cache" / "federation" / f"site-{i + 1:02d}" / "run"
        kept = torch.load(store / f"gan-generator-{digest}.pt")
        assert all(same(kept[GAN_G_PREFIX + k], v) for k, v in generator.items())
        assert not (store / "gan-generator.pt").exists()  # design (ii)'s own generator: never trained
    for path in round_checkpoints(out):
        meta = load_checkpoint(path)
        assert (meta.gan is not None) == (meta.meta["stage"] == GAN_STAGE)
    published = [p for p in (out / "global.pt", out / "best.pt") if p.is_file()]  # best.pt: if a round scored
    assert out / "global.pt" in published and all(load_checkpoint(p).gan is None for p in published)


def test_a_failed_site_is_named_and_the_gan_round_goes_on(data_root, tmp_path):
    """site-02 loses its data in GAN round 2: named in the history; site-01 alone makes the round."""
    rc = config(data_root, tmp_path, **{"rounds.gan": 1, "rounds.stage2": 1, "strategy.min-train-nodes": 1})
    grid = make_grid(rc)

    def sabotage(msg):
        rnd = msg.content[CONFIG][SERVER_ROUND] if CONFIG in msg.content else 0
        grid.nodes[101][1].node_config["partition-id"] = 99 if rnd == 2 else 1

    grid.before_delivery = sabotage
    history = run_federation(grid, rc)
    gan = history.rounds[1]
    assert gan["stage"] == GAN_STAGE and not gan.get("skipped")
    assert [(f["site"], f["phase"]) for f in gan["failures"]] == [("site-02", GAN_STAGE)]
    assert "partition 99 has no site" in gan["failures"][0]["reason"]
    assert sorted(gan["train"]["sites"]) == ["site-01", "site-03"]
    replies = [s.reply for s in gan_deliveries(grid, 2) if not s.reply.has_error()]
    (site01,) = [r for r in replies if r.content[SITE]["site-id"] == "site-01"]
    saved = load_checkpoint(round_checkpoint_path(tmp_path / "run", 2)).gan
    key = next(k for k in saved if k.endswith("out_conv.weight"))
    assert np.allclose(saved[key].numpy(), site01.content[ARRAYS][key].numpy())  # the mean of one site
    assert [r["round"] for r in history.rounds] == [1, 2, 3] and not history.rounds[2]["failures"]


def test_resume_in_the_gan_stage_continues_from_the_checkpointed_g_and_d(gan_run, data_root, tmp_path):
    """A run stopped after GAN round 2 resumes at round 3 with the G and D of round 2's checkpoint."""
    shutil.copytree(gan_run["out"], tmp_path / "run")
    for p in round_checkpoints(tmp_path / "run")[2:]:
        p.unlink()  # as if the run had stopped after round 2
    rc = config(data_root, tmp_path, resume=True)
    grid = make_grid(rc)
    history = run_federation(grid, rc)
    assert {s.message.content[CONFIG][SERVER_ROUND] for s in grid.log} == {3, 4, 5}
    assert [r["round"] for r in history.rounds] == [1, 2, 3, 4, 5]
    saved = load_checkpoint(round_checkpoint_path(tmp_path / "run", 2)).gan
    for s in gan_deliveries(grid, 3):
        assert all(same(s.message.content[ARRAYS][k].numpy(), saved[k]) for k in saved)
