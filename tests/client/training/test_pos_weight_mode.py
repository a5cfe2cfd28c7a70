"""Where a site's stage-2 marker weights come from: the server's global ones, its own, or none."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.data.cache import build_site_cache
from client.data.dataset import SliceDataset, brain_slices
from client.federation.site_data import stage2_pos_weight
from common.config import PreprocessConfig
from common.model import build_joint_model
from common.presets import get_preset
from common.records import TrainInstruction
from common.run_config import parse_run_config
from tests.helpers.data import write_site
from tests.helpers.flower import run_config


def test_modes(tmp_path) -> None:
    site = write_site(tmp_path / "site-01", n_studies=4, shape=(4, 32, 32))
    cache, _ = build_site_cache(site, tmp_path / "cache", PreprocessConfig(size=32))
    ds = SliceDataset(cache, brain_slices(cache))
    model = build_joint_model(get_preset("tiny", image_size=32))
    order = TrainInstruction(server_round=3, stage=2, lr=1e-3, pos_weight=(2.0, 3.0, 4.0, 5.0))
    assert torch.equal(stage2_pos_weight("global", order, model, ds), torch.tensor([2.0, 3.0, 4.0, 5.0]))
    assert stage2_pos_weight("none", order, model, ds) is None
    labels = ds.labels()[:, :4]
    pos, neg = np.nansum(labels == 1, axis=0), np.nansum(labels == 0, axis=0)
    expected = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0)
    np.testing.assert_allclose(stage2_pos_weight("local", order, model, ds).numpy(), expected, rtol=1e-6)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="train.pos-weight must be one of"):
        parse_run_config(run_config(**{"train.pos-weight": "sitewise"}))
