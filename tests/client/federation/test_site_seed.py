"""A site's training seed: from the run's seed, the site id and the round only (issue 28 item 4)."""

from __future__ import annotations

from client.federation.site_run import SiteRunConfig, site_seed
from common.records import TrainInstruction
from tests.helpers.flower import run_config


def test_site_seed_is_stable_and_distinct_per_site_round_and_seed():
    assert site_seed(0, "site-01", 1) == site_seed(0, "site-01", 1)  # a pure function: the same in every run
    seeds = {site_seed(s, site, r) for s in (0, 1) for site in ("site-01", "site-02", "site-12") for r in (1, 2)}
    assert len(seeds) == 12  # seed + round would give seed 0 round 2 = seed 1 round 1
    assert all(0 <= s < 2**31 for s in seeds)


def test_train_config_takes_the_site_seed_and_the_baselines_keep_theirs():
    run = SiteRunConfig.from_run_config(run_config(seed=3))
    order = TrainInstruction(server_round=2, stage=1, lr=1e-3, local_steps=1)
    assert run.train_config(order, "site-05").seed == site_seed(3, "site-05", 2) == run.site_seed("site-05", 2)
    assert run.train_config(order, "site-05").seed != run.train_config(order, "site-06").seed
    assert run.train_config(order).seed == 3 + 2  # in-process local and pooled baselines: unchanged
