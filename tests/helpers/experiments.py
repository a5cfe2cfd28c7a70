"""Experiment TOML templates shared by the simulation tests and the identifier test."""

TINY = """
name = "tiny"
description = "test"
seeds = {seeds}
[budget]
rounds_stage1 = 1
rounds_stage2 = 1
local_steps = 2
batch_size = 4
[run_config]
"model.preset" = "tiny"
"model.image-size" = 32
[[scenarios]]
name = "natural"
split = "natural"
{extra_scenarios}
{methods}
"""

BASELINES = """
[[methods]]
name = "local"
kind = "local"
[[methods]]
name = "pooled"
kind = "pooled"
"""

#: TINY with 40 % of the patients in the test split, so that the small generated dataset of the
#: ceiling tests (``synthetic_root``) holds both classes of most labels there.
TINY_WIDE_TEST = TINY.replace("batch_size = 4\n", "batch_size = 4\ntest_fraction = 0.4\n")
