"""DP-SGD at the site (client/training/privacy.py): the accountant, per-slice clipping, the budget, the handlers.

Tiny preset at 32 px, one to three steps per call. Accountant checks recompute epsilon with Opacus'
RDP analysis functions directly (``compute_rdp`` + ``get_privacy_spent``), not through our helpers.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import MessageType, RecordDict

from client.client_app import app
from client.data.cache import build_site_cache
from client.federation.node import SiteNode
from client.federation.site_data import open_site
from client.federation.site_run import SiteRunConfig
from client.training.privacy import (
    DPSGD,
    PRIVACY_FILE,
    PatientPoissonSampler,
    PrivacyLedger,
    SitePrivacy,
    default_delta,
    epsilon_spent,
    micro_batch_indices,
    noise_for_budget,
    round_steps,
    sample_rate,
    usable_slices,
)
from client.training.train import TrainConfig, stage_loss, train_stage
from common.model import build_joint_model, freeze_unet, half_state_dict
from common.presets import get_preset
from common.records import (
    ARRAYS,
    CONFIG,
    FROZEN_UNET,
    METRICS,
    NUM_EXAMPLES,
    PRIVACY_DELTA,
    PRIVACY_EPSILON,
    PRIVACY_EXHAUSTED,
    TRAIN_LOSS,
    TrainInstruction,
    arrays_digest,
    state_to_record,
)
from common.run_config import model_from_run_config, parse_run_config
from server.federation import run_federation
from server.replies import idle_reason
from simulations.sites import prepare_caches
from tests.helpers.data import write_site
from tests.helpers.dp import IMAGE, FakeSlices, dp_model, half_of, slice_gradients
from tests.helpers.flower import REPO, FakeGrid, make_context, make_message, run_config, set_task_identity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DP = {
    "privacy.dp": True,
    "privacy.unit": "slice",  # the per-slice tests below; per-patient ones set "patient"
    "model.image-size": IMAGE,
    "train.local-steps": 2,
    "train.batch-size": 4,
    "rounds.stage1": 2,
    "rounds.stage2": 2,
}


def independent_epsilon(phases: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of ``(sigma, q, steps)`` phases straight from Opacus' RDP analysis."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=k, orders=orders) for s, q, k in phases)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


# --- the accountant ------------------------------------------------------------------------


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_noise_for_a_target_epsilon_spends_that_epsilon(target):
    from opacus.accountants.utils import get_noise_multiplier

    q, steps, delta = 8 / 300, 120, 1 / 300
    sigma = noise_for_budget(target, delta, [(q, steps)])
    assert sigma == pytest.approx(
        get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp"),
        rel=1e-12,
    )
    eps = independent_epsilon([(sigma, q, steps)], delta)
    assert target - 0.01 <= eps <= target
    assert independent_epsilon([(sigma * 0.98, q, steps)], delta) > eps  # less noise would spend more


def test_two_stages_share_one_budget():
    """Stage 1 and stage 2 sample from different slices; their composition spends the target."""
    phases, delta = [(4 / 60, 40), (4 / 45, 30)], 1 / 80
    sigma = noise_for_budget(4.0, delta, phases)
    eps = independent_epsilon([(sigma, q, k) for q, k in phases], delta)
    assert 3.99 <= eps <= 4.0
    assert eps > independent_epsilon([(sigma, *phases[0])], delta)
    assert epsilon_spent([(sigma, q, k) for q, k in phases], delta) == pytest.approx(eps)


def test_round_steps_follow_train_stage():
    assert sample_rate(50, 8) == 0.16 and sample_rate(3, 8) == 1.0
    assert round_steps(50, 8, epochs=1, max_steps=0) == 6
    assert round_steps(50, 8, epochs=2, max_steps=5) == 5
    assert round_steps(0, 8, epochs=1, max_steps=5) == 0
    with pytest.raises(ValueError):
        noise_for_budget(8.0, 1e-3, [(0.1, 0)])


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("privacy.noise-multiplier", -0.5, "privacy.noise-multiplier must be >= 0"),
        ("privacy.target-epsilon", 0.0, "privacy.target-epsilon must be > 0"),
        ("privacy.delta", 1.0, r"privacy.delta must be in \[0, 1\)"),
        ("privacy.unit", "study", r"privacy.unit must be 'patient' or 'slice'"),
        ("privacy.max-grad-norm", 0.0, "privacy.max-grad-norm must be > 0"),
        (
            "privacy.max-grad-norm-stage2",
            -1.0,
            r"privacy.max-grad-norm-stage2 must be >= 0 \(0: privacy.max-grad-norm\)",
        ),
        ("privacy.physical-batch", -1, r"privacy.physical-batch must be >= 0"),
    ],
)
def test_config_errors_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        parse_run_config(run_config(**{"privacy.dp": True, key: value}))
    with pytest.raises(ValueError, match=message):  # the server and every site stop at the same check
        model_from_run_config(run_config(**{"privacy.dp": True, key: value}))


def test_dp_forces_group_norm_and_says_so(caplog):
    off = model_from_run_config(run_config(**{"model.norm": "batch"}))[0]
    assert off.norm == "batch"
    with caplog.at_level(logging.INFO, logger="flwr"):
        on = model_from_run_config(run_config(**{"privacy.dp": True, "model.norm": "batch"}))[0]
    assert on.norm == "group"
    assert "model.norm 'batch' replaced by 'group'" in caplog.text


def test_opacus_validator_passes_on_the_dp_model():
    from opacus.validators import ModuleValidator

    cfg, _ = model_from_run_config(run_config(**{"privacy.dp": True, "model.image-size": IMAGE}))
    assert ModuleValidator.validate(build_joint_model(cfg, seed=0), strict=False) == []
    batch_norm = build_joint_model(get_preset("tiny", image_size=IMAGE), seed=0)
    assert ModuleValidator.validate(batch_norm, strict=False)  # BatchNorm: refused
    with pytest.raises(ValueError, match="cannot be trained privately"):
        DPSGD(1.0, 1.0).attach(
            batch_norm.unet,
            torch.optim.SGD(batch_norm.unet.parameters(), lr=0.1),
            torch.utils.data.DataLoader(FakeSlices(4), batch_size=2),
        )
    group = build_joint_model(cfg, seed=0).eval()  # as train_stage leaves it: a second call must work too
    dp = DPSGD(1.0, 1.0)
    dp.attach(group.unet, torch.optim.SGD(group.unet.parameters(), lr=0.1), torch.utils.data.DataLoader(FakeSlices(4)))
    dp.detach()
    assert not any(m.training for m in group.modules())


# --- per-slice gradients and clipping ---------------------------------------------------------


def assert_near(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Close in norm: a batch of 3 and a batch of 1 run different float32 convolution kernels, whose
    rounding differs by about 0.2 % through the classifier's 13 convolutions (plain autograd too)."""
    assert float((actual - expected).norm()) <= rel * float(expected.norm()) + 1e-9


@pytest.mark.parametrize("stage", [1, 2])
def test_per_slice_gradients_match_one_slice_at_a_time(stage):
    """Opacus' hooks cover every trainable layer of the half (EfficientNet's same-padding convs,
    GroupNorm, the layers around the DWT pooling, the head) and give each slice its own gradient."""
    model, ds = dp_model(), FakeSlices(3)
    if stage == 2:
        freeze_unet(model)
    model.train()
    half = half_of(model, stage)
    params = [p for p in half.parameters() if p.requires_grad]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    batch_grads = torch.autograd.grad(
        stage_loss(model, batch, stage, None, torch.device("cpu"), per_sample=True), params
    )
    dp = DPSGD(0.0, 1.0, seed=0)
    opt, _ = dp.attach(half, torch.optim.SGD(params, lr=0.1), torch.utils.data.DataLoader(ds, batch_size=3))
    try:
        opt.zero_grad(set_to_none=True)
        stage_loss(model, batch, stage, None, torch.device("cpu"), per_sample=True).backward()
        per_slice = [p.grad_sample.clone() for p in params]
    finally:
        dp.detach()
    assert all(not hasattr(p, "grad_sample") for p in params)  # detach leaves the parameters clean
    for g_hook, g_batch in zip(per_slice, batch_grads):  # the same forward: the mean is the batch gradient
        assert_near(g_hook.mean(dim=0), g_batch, 1e-4)
    for i, grads in enumerate(slice_gradients(model, batch, stage, params)):
        # each slice's whole gradient (every layer in one vector: a layer whose gradient is ~1e-9 of
        # the total is float noise on its own, but any layer off by a real amount shows here)
        assert_near(torch.cat([g[i].flatten() for g in per_slice]), torch.cat([g.flatten() for g in grads]), 1e-2)
        for g_hook, g_loop in zip(per_slice, grads):
            assert g_hook[i].shape == g_loop.shape


def one_sgd_step(lr: float) -> TrainConfig:
    """One plain SGD step over a batch larger than the data (q = 1): what the clipping checks compute by hand."""
    return TrainConfig(
        epochs=1,
        max_steps=1,
        batch_size=8,
        lr=lr,
        weight_decay=0.0,
        optimizer="sgd",
        schedule="constant",
        augment=False,
        balanced=False,
    )


@pytest.mark.parametrize("stage", [1, 2])
def test_clipping_bounds_the_update_by_lr_times_c(stage):
    """Noise 0, C tiny, SGD, every slice in the batch (q = 1): the step is exactly
    -lr * mean_i(g_i * C / |g_i|), so its norm is at most lr * C."""
    model, ds = dp_model(), FakeSlices(4)
    lr, clip = 100.0, 1e-4  # a large lr: the update stands well above the float32 rounding of the weights
    cfg = one_sgd_step(lr)
    if stage == 2:
        freeze_unet(model)
    model.train()
    half = half_of(model, stage)
    params = [p for p in half.parameters() if p.requires_grad]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    clipped = [torch.zeros_like(p) for p in params]
    for grads in slice_gradients(model, batch, stage, params):
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        assert norm > 100 * clip  # every slice is clipped
        for c, g in zip(clipped, grads):
            c += g * (clip / (norm + 1e-6)) / 4
    before = [p.detach().clone() for p in params]
    dp = DPSGD(0.0, clip, seed=0)
    result = train_stage(model, torch.utils.data.DataLoader(ds, batch_size=8), stage, cfg, privacy=dp)
    assert result.steps == 1 and dp.steps == 1 and result.num_examples == 4
    update = torch.cat([(p.detach().double() - b.double()).flatten() for p, b in zip(params, before)])
    assert_near(update, -lr * torch.cat([c.double().flatten() for c in clipped]), 1e-2)
    assert float(update.norm()) <= lr * clip * (1 + 1e-3)


def test_every_step_is_noisy_empty_poisson_batches_included():
    """An empty Poisson batch still takes a noise-only step (skipping it would tell it was empty)."""
    model, ds = dp_model(), FakeSlices(4)
    cfg = TrainConfig(
        epochs=1,
        max_steps=3,
        batch_size=1,
        lr=0.1,
        weight_decay=0.0,
        optimizer="sgd",
        schedule="constant",
        augment=False,
        balanced=False,
    )

    def draws(seed: int) -> list[int]:  # the batch sizes UniformWithReplacementSampler draws with this seed
        g = torch.Generator().manual_seed(seed)
        return [int((torch.rand(4, generator=g) < 0.25).sum()) for _ in range(3)]

    seed = next(s for s in range(100) if 0 in draws(s) and sum(draws(s)) > 0)
    dp = DPSGD(2.0, 1.0, seed=seed)
    before = half_state_dict(model, "unet")
    result = train_stage(model, torch.utils.data.DataLoader(ds, batch_size=1), 1, cfg, privacy=dp)
    assert dp.sample_rate == 0.25
    assert result.steps == dp.steps == 3 and result.num_examples == sum(draws(seed))
    assert all(
        not torch.equal(v, before[k]) for k, v in half_state_dict(model, "unet").items() if v.is_floating_point()
    )  # noise reaches every weight
    batch = DPSGD(1.0, 1.0).make_loader(ds, 1).collate_fn([])  # what an empty Poisson draw gives
    assert batch["image"].shape == (0, IMAGE, IMAGE) and stage_loss(model, batch, 1, None, torch.device("cpu")) is None


# --- the ClientApp under privacy.dp ----------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dp_site")
    data = write_site(root / "data" / "site-04", n_studies=5, shape=(4, 40, 40), seed=5)
    _, pre = model_from_run_config(run_config(**DP))
    build_site_cache(data, root / "cache", pre)
    return {"data-path": str(data), "cache-dir": str(root / "cache")}


def dp_message(model, stage: int, server_round: int, run_name: str) -> RecordDict:
    half = "unet" if stage == 1 else "classifier"
    unet = state_to_record(half_state_dict(model, "unet"))
    order = TrainInstruction(
        server_round=server_round,
        stage=stage,
        lr=1e-3,
        local_steps=2,
        run_name=run_name,
        unet_digest=arrays_digest(unet) if stage == 2 else "",
        pos_weight=(2.0, 1.0, 1.0, 3.0) if stage == 2 else None,
    )
    content = RecordDict({ARRAYS: state_to_record(half_state_dict(model, half)), CONFIG: order.to_record()})
    if stage == 2:
        content[FROZEN_UNET] = unet
    return content


def train_call(node: dict, rc: dict, model, stage: int, server_round: int, run_name: str):
    reply = app(
        make_message(dp_message(model, stage, server_round, run_name), MessageType.TRAIN), make_context(node, rc)
    )
    assert not reply.has_error()
    return reply


def changed(reply, model, half: str) -> bool:
    before = half_state_dict(model, half)
    return any(not np.allclose(reply.content[ARRAYS][k].numpy(), before[k].numpy()) for k in before)


def usable_count(node: dict, rc: dict, stage: int) -> int:
    run = SiteRunConfig.from_run_config(rc)
    data = open_site(SiteNode.from_context(make_context(node, rc), run.config.data), run)
    return int(usable_slices(data.train, stage, run.model).sum())


def test_dp_training_through_the_handler_in_both_stages(site, tmp_path):
    node, rc = {**site, "cache-dir": str(tmp_path / "cache")}, run_config(**DP)
    shutil.copytree(site["cache-dir"], tmp_path / "cache")
    model = build_joint_model(model_from_run_config(rc)[0], seed=0)
    assert model.cfg.norm == "group"
    run, epsilons = SiteRunConfig.from_run_config(rc), []
    for rnd, stage in ((1, 1), (2, 1), (3, 2)):
        reply = train_call(node, rc, model, stage, rnd, "dp-run")
        metrics = reply.content[METRICS]
        assert changed(reply, model, "unet" if stage == 1 else "classifier")
        assert metrics[NUM_EXAMPLES] == usable_count(node, rc, stage) > 0
        assert metrics[PRIVACY_EXHAUSTED] == 0 and math.isnan(metrics[TRAIN_LOSS])  # the loss is not released
        assert metrics[PRIVACY_DELTA] == pytest.approx(
            1 / len(open_site(SiteNode.from_context(make_context(node, rc), run.config.data), run).train)
        )
        epsilons.append(metrics[PRIVACY_EPSILON])
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] <= 8.0  # the run's default budget

    # The ledger survives the process: a fresh interpreter reads the same epsilon from the site's disk.
    path = tmp_path / "cache" / "federation" / "site-04" / "dp-run" / PRIVACY_FILE
    ledger = json.loads(path.read_text())
    assert [r["round"] for r in ledger["rounds"]] == [1, 2, 3] and [r["stage"] for r in ledger["rounds"]] == [1, 1, 2]
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from client.training.privacy import "
            "PrivacyLedger; print(PrivacyLedger.load(Path(sys.argv[1])).epsilon())",
            str(path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(out.stdout) == pytest.approx(epsilons[-1], rel=1e-9)
    assert independent_epsilon([tuple(h) for h in ledger["history"]], ledger["delta"]) == pytest.approx(
        epsilons[-1], rel=1e-6
    )
    # The plan spends exactly the budget over the run's 2 + 2 planned rounds.
    plan = [(ledger["noise_multiplier"], q, k) for q, k in ledger["planned"]]
    assert 8.0 - 0.01 <= independent_epsilon(plan, ledger["delta"]) <= 8.0


def test_a_site_whose_budget_is_spent_does_not_train(site, tmp_path, caplog):
    """Given noise: one stage-1 round fits the budget, the second would not."""
    shutil.copytree(site["cache-dir"], tmp_path / "cache")
    node = {**site, "cache-dir": str(tmp_path / "cache")}
    base = run_config(**DP)
    n = usable_count(node, base, 1)
    q, steps, delta = sample_rate(n, 4), round_steps(n, 4, 1, 2), 1 / 20
    one, two = (independent_epsilon([(1.0, q, k * steps)], delta) for k in (1, 2))
    rc = run_config(
        **{**DP, "privacy.noise-multiplier": 1.0, "privacy.delta": delta, "privacy.target-epsilon": (one + two) / 2}
    )
    model = build_joint_model(model_from_run_config(rc)[0], seed=0)
    first = train_call(node, rc, model, 1, 1, "tight")
    assert first.content[METRICS][PRIVACY_EPSILON] == pytest.approx(one, rel=1e-6)
    with caplog.at_level(logging.INFO, logger="flwr"):
        second = train_call(node, rc, model, 1, 2, "tight")
    metrics = second.content[METRICS]
    assert metrics[NUM_EXAMPLES] == 0 and metrics[PRIVACY_EXHAUSTED] == 1
    assert metrics[PRIVACY_EPSILON] == pytest.approx(one, rel=1e-6)  # nothing more spent
    assert not changed(second, model, "unet")  # the weights sent back are the ones received
    assert f"privacy budget spent (epsilon {one:.3f} of {(one + two) / 2:.3f})" in caplog.text
    assert "did not train: privacy budget spent" in idle_reason(metrics)
    with pytest.raises(Exception, match="ValueError"):  # the budget of a run cannot change midway
        train_call(node, {**rc, "privacy.target-epsilon": 100.0}, model, 1, 3, "tight")


# --- the server's history ------------------------------------------------------------------------


def test_per_site_epsilon_lands_in_history_json(tmp_path, caplog):
    """2 sites, one stage-1 and one stage-2 round, q = 1 (batch larger than a site): the second
    round would exceed the budget at both sites, which stay out of the aggregate, and say why."""
    set_task_identity()
    root = tmp_path / "data"
    for i in range(2):
        write_site(root / f"site-{i + 1:02d}", n_studies=4, shape=(4, 40, 40), seed=20 + i)
    sigma, delta = 1.5, 0.01
    one, two = (independent_epsilon([(sigma, 1.0, k)], delta) for k in (1, 2))
    rc = run_config(
        **{
            **DP,
            "data.root": str(root),
            "output.dir": str(tmp_path / "runs"),
            "output.name": "dp",
            "rounds.stage1": 1,
            "rounds.stage2": 1,
            "train.batch-size": 64,
            "train.local-steps": 1,
            "privacy.noise-multiplier": sigma,
            "privacy.delta": delta,
            "privacy.target-epsilon": (one + two) / 2,
        }
    )
    prepare_caches(root, model_from_run_config(rc)[1], progress=False)
    grid = FakeGrid(
        {100 + i: (app, make_context({"partition-id": i, "num-partitions": 2}, rc, node_id=100 + i)) for i in range(2)}
    )
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_federation(grid, rc)
    history = json.loads((tmp_path / "runs" / "dp" / "history.json").read_text())
    first, second = history["rounds"]
    for site_id in ("site-01", "site-02"):
        assert first["train"]["sites"][site_id][PRIVACY_EPSILON] == pytest.approx(one, rel=1e-6)
        assert first["train"]["sites"][site_id][PRIVACY_EXHAUSTED] == 0
        assert second["train"]["sites"][site_id][PRIVACY_EXHAUSTED] == 1
        assert second["train"]["sites"][site_id][NUM_EXAMPLES] == 0
        assert f"train: site {site_id} did not train: privacy budget spent (epsilon {one:.3f})" in caplog.text
    assert history["run"]["model"]["norm"] == "group"
    assert second.get("skipped") and not first.get("skipped")


# --- per-patient DP-SGD (privacy.unit = "patient") ---------------------------------------------------


def test_patient_batches_hold_whole_patients():
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    sampler = PatientPoissonSampler(groups, 0.5, 200, torch.Generator().manual_seed(0))
    drawn = np.zeros(4)
    for batch in sampler:
        patients = set(groups[batch])
        assert sorted(batch) == sorted(np.flatnonzero(np.isin(groups, list(patients))).tolist())  # all their slices
        assert list(sampler.current) == list(groups[batch])
        drawn[list(patients)] += 1
    assert np.all(np.abs(drawn / 200 - 0.5) < 0.15)  # each patient drawn with probability q, independently


@pytest.mark.parametrize("stage", [1, 2])
def test_patient_clipping_bounds_a_patient_of_many_slices(stage):
    """Patient 0 has 5 slices, patient 1 one. Noise 0, q = 1, C tiny, SGD: the step is
    -lr * (clip(sum of patient 0's gradients) + clip(patient 1's)) / 2, so patient 0 moves the model by
    at most lr * C / 2, like patient 1; per slice it would have counted five times."""
    model, ds = dp_model(), FakeSlices(6)
    groups = np.array([0, 0, 0, 0, 0, 1])
    lr, clip = 100.0, 1e-4
    cfg = one_sgd_step(lr)
    if stage == 2:
        freeze_unet(model)
    model.train()
    params = [p for p in half_of(model, stage).parameters() if p.requires_grad]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=6)))
    per_patient = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    for i, grads in enumerate(slice_gradients(model, batch, stage, params)):
        for acc, g in zip(per_patient[groups[i]], grads):
            acc += g
    expected = [torch.zeros_like(p) for p in params]
    for sums in per_patient:
        norm = torch.sqrt(sum((g**2).sum() for g in sums))
        assert norm > 100 * clip
        for e, g in zip(expected, sums):
            e += g * (clip / (norm + 1e-6)) / 2  # the mean over the expected 2 patients
    before = [p.detach().clone() for p in params]
    dp = DPSGD(0.0, clip, seed=0, groups=groups)
    result = train_stage(model, torch.utils.data.DataLoader(ds, batch_size=8), stage, cfg, privacy=dp)
    assert result.steps == dp.steps == 1 and result.num_examples == 6 and dp.sample_rate == 1.0
    update = torch.cat([(p.detach().double() - b.double()).flatten() for p, b in zip(params, before)])
    assert_near(update, -lr * torch.cat([e.double().flatten() for e in expected]), 1e-2)
    assert float(update.norm()) <= lr * clip * (1 + 1e-3)


def test_patient_delta_default_is_well_below_one_over_patients():
    assert default_delta("patient", 3000, 100) == 1e-5  # 0.1 / 100 = 1e-3, capped at 1e-5
    assert default_delta("patient", 3_000_000, 100_000) == pytest.approx(1e-6)
    assert default_delta("slice", 300, 10) == pytest.approx(1 / 300)


def test_patient_dp_through_the_handler_counts_patients(site, tmp_path):
    """The reply's epsilon is Opacus' RDP accountant's at the patient sampling rate (expected patients per
    batch over training patients) and the default delta; the ledger says the unit."""
    from opacus.accountants import RDPAccountant

    shutil.copytree(site["cache-dir"], tmp_path / "cache")
    node, rc = {**site, "cache-dir": str(tmp_path / "cache")}, run_config(**{**DP, "privacy.unit": "patient"})
    run = SiteRunConfig.from_run_config(rc)
    train = open_site(SiteNode.from_context(make_context(node, rc), run.config.data), run).train
    usable = usable_slices(train, 1, run.model)
    patient_of = np.asarray([s["patient"] for s in train.cache.studies])[train.cache.slice_study()][train.indices]
    patients, usable_patients = len(set(patient_of)), len(set(patient_of[usable]))
    assert 1 < usable_patients < int(usable.sum())  # patients of several slices each
    model = build_joint_model(model_from_run_config(rc)[0], seed=0)
    reply = train_call(node, rc, model, 1, 1, "patient-run")
    metrics = reply.content[METRICS]
    assert changed(reply, model, "unet") and metrics[NUM_EXAMPLES] == int(usable.sum())
    assert metrics[PRIVACY_DELTA] == pytest.approx(min(1e-5, 0.1 / patients))
    ledger = json.loads((tmp_path / "cache" / "federation" / "site-04" / "patient-run" / PRIVACY_FILE).read_text())
    assert ledger["unit"] == "patient"
    expected_patients = 4 * usable_patients / int(usable.sum())  # batch 4 slices on average
    acc = RDPAccountant()
    acc.history = [(ledger["noise_multiplier"], expected_patients / usable_patients, 2)]  # 2 local steps
    assert metrics[PRIVACY_EPSILON] == pytest.approx(acc.get_epsilon(delta=metrics[PRIVACY_DELTA]), rel=1e-9)


# --- micro-batches (privacy.physical-batch), a clipping bound per stage, DP on stage 2 only -------------


def test_micro_batches_hold_whole_patients():
    """Patients of 3, 1, 2 and 4 slices, at most 3 slices per micro-batch: packed in batch order, the patient
    of 4 alone (never split); a patient whose slices are not adjacent still goes whole."""
    groups = np.array([5, 5, 5, 2, 7, 7, 1, 1, 1, 1])
    parts = micro_batch_indices(groups, 3)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [p.tolist() for p in micro_batch_indices(groups, 0)] == [list(range(10))]  # off
    assert [p.tolist() for p in micro_batch_indices(groups, 10)] == [list(range(10))]  # the batch fits
    assert [p.tolist() for p in micro_batch_indices(np.array([0, 1, 0]), 2)] == [[0, 2], [1]]
    assert [p.tolist() for p in micro_batch_indices(np.zeros(0, np.int64), 4)] == [[]]  # an empty Poisson batch


@pytest.mark.parametrize("stage", [1, 2])
def test_micro_batches_give_the_step_of_the_whole_batch(stage):
    """The same Poisson batches (q = 1) and the same noise seed, with and without micro-batches of at most 3
    slices (patients of 3, 1 + 2 and 4 slices: three micro-batches, the last patient larger than the physical
    batch): the same two updates, so the clipped patient sums are accumulated, the noise is added once per
    batch and the optimizer (SGD with momentum) steps once; the accountant's count is two steps either way."""
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    cfg = replace(one_sgd_step(100.0), epochs=2, max_steps=2, batch_size=16)
    updates, models = [], []
    for physical in (0, 3):
        model = dp_model()
        params = [p for p in half_of(model, stage).parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        dp = DPSGD(0.5, 1e-4, seed=3, groups=groups, physical_batch=physical)
        result = train_stage(model, torch.utils.data.DataLoader(FakeSlices(10), batch_size=16), stage, cfg, privacy=dp)
        assert result.steps == dp.steps == 2 and result.num_examples == 20 and dp.sample_rate == 1.0
        updates.append(torch.cat([(p.detach().double() - b.double()).flatten() for p, b in zip(params, before)]))
        models.append(dp)
    assert models[1]._part_groups.tolist() == [3, 3, 3, 3]  # the last micro-batch: the 4-slice patient alone
    assert float(updates[0].norm()) > 0
    assert_near(updates[1], updates[0], 1e-3)


def test_each_stage_clips_at_its_own_bound(site, tmp_path):
    """privacy.max-grad-norm-stage2 is stage 2's C (0: stage 1's); the ledger keeps both, a later round may
    not change them, and privacy.physical-batch reaches the optimiser."""
    shutil.copytree(site["cache-dir"], tmp_path / "cache")
    node = {**site, "cache-dir": str(tmp_path / "cache")}
    rc = run_config(
        **{**DP, "privacy.unit": "patient", "privacy.max-grad-norm-stage2": 0.25, "privacy.physical-batch": 3}
    )
    run = SiteRunConfig.from_run_config(rc)
    train = open_site(SiteNode.from_context(make_context(node, rc), run.config.data), run).train
    for stage, clip in ((1, 1.0), (2, 0.25)):
        order = TrainInstruction(server_round=stage, stage=stage, lr=1e-3, local_steps=2, run_name="clip")
        private = SitePrivacy.open(run.config, tmp_path / "store", train, order, run.train_config(order), run.model)
        dp = private.dpsgd()
        assert (dp.max_grad_norm, dp.physical_batch) == (clip, 3)
        private.ledger.save(private.path)
    assert json.loads((tmp_path / "store" / PRIVACY_FILE).read_text())["max_grad_norm_stage2"] == 0.25
    changed_rc = SiteRunConfig.from_run_config({**rc, "privacy.max-grad-norm-stage2": 0.5})
    with pytest.raises(ValueError, match="privacy.max-grad-norm-stage2 changed since this site's first round"):
        SitePrivacy.open(
            changed_rc.config, tmp_path / "store", train, order, changed_rc.train_config(order), changed_rc.model
        )
    old = PrivacyLedger(1.0, 1e-5, 8.0, 0.7, True)  # a ledger written before the key: stage 2 clips at C
    assert (old.clip(1), old.clip(2)) == (0.7, 0.7)


def test_dp_on_stage_2_only_keeps_the_pretrained_unet_and_spends_the_budget_there(tmp_path):
    """rounds.stage1 = 0 with train.init-checkpoint: the U-Net every site receives and the final model's are
    the checkpoint's, the sites' plan holds stage 2's steps only, and the two stage-2 rounds spend the whole
    budget (the derived sigma over the planned steps)."""
    from common.checkpoint import load_checkpoint, save_checkpoint

    set_task_identity()
    root = tmp_path / "data"
    for i in range(2):
        write_site(root / f"site-{i + 1:02d}", n_studies=4, shape=(4, 40, 40), seed=30 + i)
    base = run_config(**DP)
    model_cfg, pre = model_from_run_config(base)
    pretrained = build_joint_model(model_cfg, seed=7)
    init = save_checkpoint(tmp_path / "pretrained.pt", pretrained, model_cfg, pre)
    rc = run_config(
        **{
            **DP,
            "privacy.unit": "patient",
            "data.root": str(root),
            "output.dir": str(tmp_path / "runs"),
            "output.name": "stage2",
            "rounds.stage1": 0,
            "rounds.stage2": 2,
            "train.init-checkpoint": str(init),
        }
    )
    prepare_caches(root, pre, progress=False)
    grid = FakeGrid(
        {100 + i: (app, make_context({"partition-id": i, "num-partitions": 2}, rc, node_id=100 + i)) for i in range(2)}
    )
    run_federation(grid, rc)
    history = json.loads((tmp_path / "runs" / "stage2" / "history.json").read_text())
    assert [r["stage"] for r in history["rounds"]] == [2, 2]
    final = load_checkpoint(tmp_path / "runs" / "stage2" / "global.pt").state_dict
    start = pretrained.state_dict()
    assert all(torch.equal(final[k], v) for k, v in start.items() if k.startswith("unet."))
    assert any(not torch.equal(final[k], v) for k, v in start.items() if k.startswith("classifier."))
    ledgers = sorted((root / ".cache" / "federation").glob(f"*/stage2/{PRIVACY_FILE}"))
    assert len(ledgers) == 2
    for path in ledgers:
        ledger = json.loads(path.read_text())
        ((_, planned),) = ledger["planned"]  # stage 2 only
        assert [r["stage"] for r in ledger["rounds"]] == [2, 2]
        assert planned == sum(r["steps"] for r in ledger["rounds"]) > 0  # the plan is what the two rounds ran
        spent = independent_epsilon([tuple(h) for h in ledger["history"]], ledger["delta"])
        assert 8.0 - 0.01 <= spent <= 8.0  # the whole budget, on stage 2
