"""``train.init-checkpoint``: the global model (and so every site in round 1) starts from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from common.checkpoint import save_checkpoint
from common.config import PreprocessConfig
from common.model import build_joint_model
from common.presets import get_preset
from server.federation import load_initial_weights


def test_the_global_model_starts_from_the_checkpoint(tmp_path):
    cfg = get_preset("tiny", image_size=32, norm="group")
    pretrained = build_joint_model(cfg, seed=5)
    path = save_checkpoint(tmp_path / "pre.pt", pretrained, cfg, PreprocessConfig(size=32))
    model = build_joint_model(cfg, seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), pretrained.state_dict().values()))
    load_initial_weights(model, str(path))
    for key, value in pretrained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    batch = get_preset("tiny", image_size=32, norm="batch")
    path = save_checkpoint(tmp_path / "bn.pt", build_joint_model(batch, seed=0), batch, PreprocessConfig(size=32))
    with pytest.raises(ValueError, match="train.init-checkpoint .* architecture differs"):
        load_initial_weights(build_joint_model(get_preset("tiny", image_size=32, norm="group"), seed=0), str(path))
