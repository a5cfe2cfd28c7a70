"""The local training loop, splits and the pooled ``hemexp train`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client.data.cache import build_site_cache
from client.data.dataset import SliceDataset, assign_groups, brain_slices, make_loader, split_slices
from client.training.train import Acceleration, TrainConfig, augment_batch, fed_loader, train_stage, trainable_half
from common.checkpoint import load_checkpoint
from common.config import PreprocessConfig
from common.model import build_joint_model
from common.presets import get_preset
from simulations.cli import hemexp_main
from tests.helpers.data import write_site

TINY = get_preset("tiny", image_size=32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    site = write_site(root / "site-01", n_studies=6, shape=(5, 32, 32))
    built, _ = build_site_cache(site, root / "cache", PreprocessConfig(size=32))
    return built


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _loader(cache, seed=0):
    return make_loader(SliceDataset(cache, brain_slices(cache)), 8, shuffle=True, seed=seed)


def test_stage2_leaves_every_unet_weight_and_buffer_bit_identical(cache) -> None:
    model = build_joint_model(TINY, seed=0)
    unet, clf = _state(model.unet), _state(model.classifier)
    train_stage(model, _loader(cache), 2, TrainConfig(epochs=2, lr=1e-2))
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in unet.items())
    assert any(not torch.equal(v, model.classifier.state_dict()[k]) for k, v in clf.items())


def test_stage1_trains_only_the_unet(cache) -> None:
    model = build_joint_model(TINY, seed=0)
    unet, clf = _state(model.unet), _state(model.classifier)
    result = train_stage(model, _loader(cache), 1, TrainConfig(epochs=1, lr=1e-2))
    assert all(torch.equal(v, model.classifier.state_dict()[k]) for k, v in clf.items())
    assert any(not torch.equal(v, model.unet.state_dict()[k]) for k, v in unet.items())
    assert result.num_examples == len(brain_slices(cache))  # samples, not batches
    assert result.steps == int(np.ceil(len(brain_slices(cache)) / 8))


def test_training_is_deterministic_by_seed(cache) -> None:
    states = []
    for _ in range(2):
        model = build_joint_model(TINY, seed=1)
        train_stage(model, _loader(cache, seed=3), 1, TrainConfig(epochs=1, seed=3))
        states.append(_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_fedprox_term_keeps_weights_near_the_start(cache) -> None:
    drift = {}
    for mu in (0.0, 20.0):
        model = build_joint_model(TINY, seed=0)
        start = torch.cat([p.detach().flatten().clone() for p in model.unet.parameters()])
        train_stage(model, _loader(cache), 1, TrainConfig(epochs=2, lr=1e-2, proximal_mu=mu, optimizer="sgd"))
        drift[mu] = float((torch.cat([p.detach().flatten() for p in model.unet.parameters()]) - start).norm())
    assert drift[20.0] < 0.75 * drift[0.0], drift  # without the term both drift alike


def test_augmentation_moves_image_and_mask_together() -> None:
    mask = torch.zeros(4, 1, 32, 32)
    mask[:, :, 8:14, 5:12] = 1
    image = mask.clone()
    g = torch.Generator().manual_seed(0)
    cfg = TrainConfig(rotate_degrees=15.0, intensity_jitter=0.0)
    aug_image, aug_mask = augment_batch(image, mask, cfg, g)
    agree = ((aug_image > 0.5) == (aug_mask > 0.5)).float().mean()
    assert agree > 0.98
    assert not torch.equal(aug_mask, mask)  # something did move
    assert set(torch.unique(aug_mask).tolist()) <= {0.0, 1.0}


def test_patient_split_is_disjoint_and_slice_split_is_not(cache) -> None:
    patient_of = np.asarray([s["patient"] for s in cache.studies])[cache.slice_study()]
    by_patient = split_slices(cache, seed=0)
    sets = {k: set(patient_of[v]) for k, v in by_patient.items()}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"]) and not (sets["val"] & sets["test"])
    assert sum(len(v) for v in by_patient.values()) == len(brain_slices(cache))
    by_slice = split_slices(cache, seed=0, by="slice")
    assert set(patient_of[by_slice["train"]]) & set(patient_of[by_slice["test"]])


def test_assign_groups_gives_every_split_a_group_and_is_stable() -> None:
    groups = [f"p{i}" for i in range(5)]
    a = assign_groups(groups, (0.6, 0.2, 0.2), seed=0)
    assert set(a.values()) == {"train", "val", "test"}
    assert a == assign_groups(list(reversed(groups)), (0.6, 0.2, 0.2), seed=0)


def test_hemexp_train_writes_checkpoint_metrics_and_curves(tmp_path, capsys) -> None:
    for i in range(2):
        write_site(tmp_path / "data" / f"site-0{i + 1}", n_studies=5, shape=(5, 32, 32), seed=10 * i)
    out = tmp_path / "run"
    code = hemexp_main(
        [
            "train",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["stage"] for h in metrics["history"]] == [1, 2]
    assert set(metrics["per_site"]) <= {"site-01", "site-02"} and metrics["per_site"]
    assert {"dice", "iou", "fscore", "macro_auc_study", "volume_mae_ml"} <= set(metrics["test"])
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.model_config.image_size == 32 and ckpt.meta["method"] == "pooled"
    torch.load(out / "checkpoint.pt", weights_only=True)  # safe loading works
    assert (out / "curves.png").stat().st_size > 1000
    assert "test: dice" in capsys.readouterr().out


@pytest.mark.parametrize("stage", [1, 2])
def test_cpu_default_is_the_plain_loop_bit_for_bit(cache, stage) -> None:
    """On the CPU ``train_stage`` picks no speed option (``Acceleration.for_device``), and its weights are
    exactly those of the plain reference loop the GPU benchmark compares against."""
    from benchmarks.bench_gpu_train import plain_loop

    assert Acceleration.for_device("cpu") == Acceleration()
    ds = SliceDataset(cache, brain_slices(cache))
    cfg = TrainConfig(schedule="constant", epochs=5, max_steps=3, batch_size=4, seed=3)
    pos_weight = torch.full((4,), 2.0) if stage == 2 else None
    ours, plain = build_joint_model(TINY, seed=0), build_joint_model(TINY, seed=0)
    result = train_stage(ours, make_loader(ds, 4, shuffle=True, seed=1), stage, cfg, "cpu", pos_weight)
    losses = plain_loop(plain, make_loader(ds, 4, shuffle=True, seed=1), stage, cfg, torch.device("cpu"), pos_weight)
    assert result.steps == len(losses) == 3 and result.loss == pytest.approx(np.mean(losses), abs=0)
    for (key, a), b in zip(ours.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_channels_last_trains_like_fp32_and_returns_contiguous_weights(cache, stage) -> None:
    """The GPU options run on the CPU too (bf16 autocast through the wavelet pooling included): the
    losses follow fp32's within bf16 rounding, the trained half moves, and the weights leave NCHW."""
    from benchmarks.bench_gpu_train import StepClock

    ds = SliceDataset(cache, brain_slices(cache))
    cfg = TrainConfig(schedule="constant", epochs=5, max_steps=3, batch_size=4, seed=3)
    runs = {}
    for name, accel in {"fp32": Acceleration(), "bf16": Acceleration(bf16=True, channels_last=True)}.items():
        model = build_joint_model(TINY, seed=0)
        before = _state(trainable_half(model, stage))
        clock = StepClock()
        train_stage(model, make_loader(ds, 4, True, seed=1), stage, cfg, on_step=clock, accel=accel)
        runs[name] = clock.losses
        after = _state(trainable_half(model, stage))
        assert any(not torch.equal(before[k], after[k]) for k in before)
        assert all(p.is_contiguous() for p in model.parameters())
    np.testing.assert_allclose(runs["bf16"], runs["fp32"], rtol=0.05)


def test_fed_loader_gives_the_same_batches_from_worker_processes(cache) -> None:
    ds = SliceDataset(cache, brain_slices(cache))
    plain = make_loader(ds, 4, shuffle=True, seed=5, balanced=True)
    assert fed_loader(plain, 0) is plain
    fed = fed_loader(make_loader(ds, 4, shuffle=True, seed=5, balanced=True), 2)
    assert fed.num_workers == 2 and fed.pin_memory == torch.cuda.is_available()
    for a, b in zip(plain, fed, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["study"], b["study"])
