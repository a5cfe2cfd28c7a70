"""Imbalance is corrected once, on purpose: stage-2 sampling and the loss weight are separate options,
and the paper's loss ablation compares the weight alone."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import RandomSampler, TensorDataset

from client.data.dataset import make_loader
from client.training.train import TrainConfig
from common.run_config import parse_run_config
from simulations.experiment import load_experiment
from simulations.runner import full_run_config, stage2_weight


def test_marker_sampling_is_its_own_option() -> None:
    assert TrainConfig().oversample(1) and not TrainConfig().oversample(2)  # the paper: natural stage 2
    assert TrainConfig(marker_sampling="balanced").oversample(2)
    assert not TrainConfig(balanced=False, marker_sampling="balanced").oversample(1)
    with pytest.raises(ValueError, match="unknown marker sampling 'half'"):
        TrainConfig(marker_sampling="half")


def test_paper_loss_arms_differ_only_in_classifier_and_weight() -> None:
    exp = load_experiment("paper_classifier_loss")
    rcs = {m.name: full_run_config(exp.method_run_config(m), 0) for m in exp.methods}
    base = rcs["vgg16"]
    for rc in rcs.values():
        assert {k for k in rc if rc[k] != base[k]} <= {"model.classifier", "train.pos-weight"}
        assert rc["train.marker-sampling"] == "natural"
    assert {(rc["model.classifier"], rc["train.pos-weight"]) for rc in rcs.values()} == {
        ("vgg", "none"),
        ("vgg", "global"),
        ("wavelet", "none"),
        ("wavelet", "global"),
    }


def test_the_unweighted_arm_applies_no_weight_and_no_oversampling() -> None:
    exp = load_experiment("paper_classifier_loss")
    ds = TensorDataset(torch.zeros(12, 1))
    for method in exp.methods:
        rc = full_run_config(exp.method_run_config(method), 0)
        cfg = TrainConfig(marker_sampling=rc["train.marker-sampling"])
        loader = make_loader(ds, 4, shuffle=True, seed=0, balanced=cfg.oversample(2), stage=2)
        assert isinstance(loader.sampler, RandomSampler)  # every slice alike, no WeightedRandomSampler
        if rc["train.pos-weight"] == "none":
            assert stage2_weight(parse_run_config(rc).train, None, ds) is None
