"""The typed run config: exactly pyproject's keys, parsed once, every error naming its key."""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, fields, is_dataclass

import pytest

from common.run_config import parse_run_config, run_config_keys
from tests.helpers.flower import REPO, run_config


def pyproject_keys() -> set[str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return set(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def test_dataclasses_cover_exactly_the_pyproject_keys():
    keys = run_config_keys()
    assert len(keys) == len(set(keys))
    assert set(keys) == pyproject_keys()


def test_no_dataclass_holds_a_default_of_its_own():
    """pyproject.toml is the one source of defaults."""
    cfg = parse_run_config(run_config())
    groups = [getattr(cfg, f.name) for f in fields(cfg) if is_dataclass(getattr(cfg, f.name))]
    assert len(groups) == 11  # ... output, gan, eval, radiomics
    for obj in [cfg, *groups]:
        assert [f.name for f in fields(obj) if f.default is not MISSING or f.default_factory is not MISSING] == []


def test_defaults_parse_to_their_types():
    cfg = parse_run_config(run_config())
    assert cfg.seed == 0 and cfg.resume is False
    assert cfg.train.lr == 0.001 and isinstance(cfg.rounds.timeout, float) and cfg.rounds.stage1 == 4
    assert cfg.strategy.name == "fedavg" and cfg.privacy.secure_counts is False
    assert cfg.data.split == pytest.approx((0.6, 0.2, 0.2))
    model, pre = cfg.architecture()
    assert pre.size == model.image_size


def test_overrides_are_read():
    cfg = parse_run_config(run_config(**{"train.lr-stage2": 0.5, "rounds.timeout": 3, "output.name": "x"}))
    assert cfg.train.lr_stage2 == 0.5 and cfg.rounds.timeout == 3.0 and cfg.output.name == "x"


def test_a_missing_key_names_itself():
    rc = run_config()
    del rc["train.batch-size"]
    with pytest.raises(KeyError, match="'train.batch-size'.*pyproject.toml"):
        parse_run_config(rc)


@pytest.mark.parametrize(
    "key, value",
    [("train.batch-size", "eight"), ("train.batch-size", 2.5), ("privacy.dp", "false"), ("train.lr", True)],
)
def test_a_value_of_the_wrong_type_names_its_key(key, value):
    with pytest.raises(ValueError, match=f"run config '{key}' must be"):
        parse_run_config(run_config(**{key: value}))


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"data.test-fraction": 0.0}, ValueError, "data.val-fraction .* must leave a training split"),
        ({"rounds.stage1": 0, "rounds.stage2": 0}, ValueError, "rounds.stage1 and rounds.stage2"),
        ({"train.pos-weight": "sitewise"}, ValueError, "train.pos-weight must be one of"),
        ({"strategy.name": "fedsgd"}, KeyError, "strategy.name: unknown strategy"),
        ({"strategy.name": "krum", "strategy.imbalance-head": True}, ValueError, "robustness"),
        ({"privacy.secure-counts": True, "strategy.imbalance-head": True}, ValueError, "switch one of the two off"),
    ],
)
def test_checks_name_the_key(overrides, error, message):
    with pytest.raises(error, match=message):
        parse_run_config(run_config(**overrides))


def test_eval_target_sensitivity_is_checked():
    assert parse_run_config(run_config()).eval.target_sensitivity == 0.0  # Youden
    assert parse_run_config(run_config(**{"eval.target-sensitivity": 0.9})).eval.target_sensitivity == 0.9
    with pytest.raises(ValueError, match="eval.target-sensitivity"):
        parse_run_config(run_config(**{"eval.target-sensitivity": 1.5}))


GAN_STAGE_ON = {"rounds.gan": 2, "gan.augment-ratio": 0.5}


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"rounds.gan": 2}, r"rounds.gan > 0 .* but gan.augment-ratio is 0"),
        ({**GAN_STAGE_ON, "rounds.stage2": 0}, r"rounds.gan > 0 .* but rounds.stage2 is 0"),
        ({"rounds.gan": -1}, r"rounds.gan must be >= 0"),
        ({**GAN_STAGE_ON, "gan.local-steps": 0}, r"gan.local-steps >= 1"),
        ({**GAN_STAGE_ON, "privacy.dp": True}, r"rounds.gan > 0 cannot be used with privacy.dp: .*without DP-SGD"),
        (
            {**GAN_STAGE_ON, "privacy.secure-updates": True},
            r"rounds.gan > 0 cannot be used with privacy.secure-updates: .*in the clear",
        ),
        (
            {**GAN_STAGE_ON, "privacy.site-dp": "server-fixed"},
            r"rounds.gan > 0 cannot be used with privacy.site-dp 'server-fixed': .*neither clipped nor noised",
        ),
    ],
)
def test_the_gan_stage_is_refused_where_it_has_no_use_or_breaks_a_privacy_option(overrides, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config(run_config(**overrides))


def test_the_gan_stage_parses():
    cfg = parse_run_config(run_config(**GAN_STAGE_ON, **{"gan.local-steps": 7}))
    assert cfg.rounds.gan == 2 and cfg.gan.local_steps == 7
