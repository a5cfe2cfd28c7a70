"""``hemexp clip-norms``: per-patient gradient norms of a checkpoint on a folder of public sites."""

from __future__ import annotations

import re

import pytest

from common.checkpoint import save_checkpoint
from common.config import PreprocessConfig
from common.model import build_joint_model
from common.presets import get_preset
from simulations.cli import hemexp_main
from tests.helpers.data import write_site

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_clip_norms_prints_quantiles_and_the_run_config_per_stage(tmp_path, capsys):
    for i in range(2):
        write_site(tmp_path / "data" / f"site-{i + 1:02d}", n_studies=3, shape=(4, 40, 40), seed=40 + i)
    cfg = get_preset("tiny", image_size=32, norm="group")
    ckpt = save_checkpoint(tmp_path / "pre.pt", build_joint_model(cfg, seed=0), cfg, PreprocessConfig(size=32))
    argv = ["clip-norms", "--model", str(ckpt), "--data", str(tmp_path / "data"), "--split", "all", "--device", "cpu"]
    assert hemexp_main(argv) == 0
    out = capsys.readouterr().out
    for stage in (1, 2):  # every study is its own patient, every slice has a mask and labels
        assert re.search(rf"stage {stage}: 6 patients; norms p10 [\d.e+-]+, .*p90 [\d.e+-]+; recommended C ", out)
    line = re.search(r"run config: privacy.max-grad-norm=(\S+) privacy.max-grad-norm-stage2=(\S+)", out)
    assert line and all(float(v) > 0 for v in line.groups())
