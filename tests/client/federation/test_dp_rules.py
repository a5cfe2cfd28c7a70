"""The site's DP rules hold in the units it writes them (issue 27, item 2): epsilon bounds are per
patient, so a run accounted per slice is refused; delta is bounded (``max-delta``, by default
1 / the site's training patients); and the site's own ledger (``client.federation.site_ledger``)
adds every run's spend whatever the server names the run, refusing a run that would take the site
past ``max-lifetime-epsilon``. The handler tests go through the real ClientApp and its policy mod."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict

from client.client_app import app
from client.data.cache import build_site_cache, inputs_key
from client.federation.policy import SitePolicy, check_delta, check_lifetime, check_run, parse_policy
from client.federation.site_ledger import LEDGER_FILE, SiteLedger
from client.site_tools.cli import flwr_client_main
from client.training.privacy import default_delta
from common.model import build_joint_model, half_state_dict
from common.records import (
    ARRAYS,
    CONFIG,
    HELLO_ACTION,
    METRICS,
    PRIVACY_EPSILON,
    PRIVACY_EXHAUSTED,
    REFUSAL,
    REFUSAL_REASONS,
    REFUSAL_RULES,
    SERVER_ROUND,
    SITE,
    TrainInstruction,
    state_to_record,
)
from common.run_config import model_from_run_config, parse_run_config
from tests.helpers.data import write_site
from tests.helpers.flower import make_context, make_message, run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Per-patient DP-SGD at 32 px, one stage-1 round planned of 2 local steps: a few seconds a round.
DP = {
    "privacy.dp": True,
    "privacy.unit": "patient",
    "privacy.target-epsilon": 2.0,
    "model.image-size": 32,
    "train.local-steps": 2,
    "train.batch-size": 4,
    "rounds.stage1": 1,
    "rounds.stage2": 1,
}


def cfg(**overrides):
    return parse_run_config(run_config(**overrides))


# --- pure rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "rule"),
    [
        (SitePolicy(max_epsilon=8.0), "max-epsilon"),
        (SitePolicy(require_dp=True), "require-dp"),
        (SitePolicy(max_lifetime_epsilon=50.0), "max-lifetime-epsilon"),
    ],
)
def test_epsilon_rules_are_per_patient(policy, rule):
    """A per-slice epsilon of 8 (what the old check let through under max-epsilon 8) is refused by
    every rule written per patient, naming the rule, the unit and the epsilon; per patient it passes."""
    per_slice = check_run(policy, cfg(**{"privacy.dp": True, "privacy.unit": "slice", "privacy.target-epsilon": 8.0}))
    assert [v.rule for v in per_slice] == [rule]
    assert "privacy.unit = 'slice'" in per_slice[0].reason and "epsilon 8 bounds one slice" in per_slice[0].reason
    per_patient = cfg(**{"privacy.dp": True, "privacy.unit": "patient", "privacy.target-epsilon": 8.0})
    assert check_run(policy, per_patient) == []


def test_epsilon_bound_and_no_dp_name_the_values():
    over = check_run(SitePolicy(max_lifetime_epsilon=4.0), cfg(**{"privacy.dp": True, "privacy.target-epsilon": 8.0}))
    assert [str(v) for v in over] == [
        "max-lifetime-epsilon: privacy budget 8 per patient (privacy.target-epsilon) exceeds this site's "
        "max-lifetime-epsilon 4"
    ]
    (no_dp,) = check_run(SitePolicy(max_epsilon=8.0), cfg())
    assert (
        str(no_dp) == "max-epsilon: privacy budget inf (privacy.dp off) exceeds this site's max-epsilon 8 per patient"
    )


def test_delta_is_bounded():
    """privacy.delta 0.5 (the run config accepts up to 0.999) is refused: against max-delta before any
    message is handled, and by default against 1 / the site's training patients when the plan is made."""
    half = cfg(**{"privacy.dp": True, "privacy.delta": 0.5})
    assert [str(v) for v in check_run(SitePolicy(max_delta=1e-5), half)] == [
        "max-delta: privacy.delta 0.5 exceeds this site's max-delta 1e-05"
    ]
    assert [str(v) for v in check_delta(SitePolicy(), 0.5, 40)] == [
        "max-delta: delta 0.5 of the run exceeds this site's bound 0.025 (default 1 / 40 training patients)"
    ]
    assert check_delta(SitePolicy(), 0.025, 40) == []
    assert check_delta(SitePolicy(), default_delta("patient", 1200, 40), 40) == []  # the project's default passes
    assert [v.rule for v in check_delta(SitePolicy(max_delta=1e-6), default_delta("patient", 1200, 40), 40)] == [
        "max-delta"
    ]


def test_lifetime_rule_counts_what_was_spent():
    assert check_lifetime(SitePolicy(max_lifetime_epsilon=10.0), 4.0, 6.0) == []
    (v,) = check_lifetime(SitePolicy(max_lifetime_epsilon=10.0), 4.0, 6.5)
    assert v.rule == "max-lifetime-epsilon" and "spent epsilon 6.5" in v.reason and "to 10.5" in v.reason


def test_new_rules_parse():
    policy = parse_policy({"max-delta": 1e-6, "max-lifetime-epsilon": 20, "privacy-ledger": "/srv/ledger.json"})
    assert (policy.max_delta, policy.max_lifetime_epsilon, policy.privacy_ledger) == (1e-6, 20.0, "/srv/ledger.json")
    with pytest.raises(ValueError, match="max-delta must be < 1"):
        parse_policy({"max-delta": 1})
    with pytest.raises(ValueError, match="privacy-ledger must be str"):
        parse_policy({"privacy-ledger": 3})


# --- the ledger ------------------------------------------------------------------------------


def test_ledger_sums_runs_and_never_forgets(tmp_path):
    ledger = SiteLedger(tmp_path / LEDGER_FILE)
    assert ledger.spent() == 0.0
    ledger.record("plan-a", 1.5, unit="patient", delta=1e-5)
    ledger.record("plan-b", 2.0, unit="patient", delta=1e-5)
    ledger.record("plan-a", 1.0, unit="patient", delta=1e-5)  # a lower figure never replaces a spend
    assert ledger.spent() == pytest.approx(3.5) and ledger.spent(excluding="plan-a") == pytest.approx(2.0)
    assert ledger.delta() == pytest.approx(2e-5)
    ledger.record("plan-c", 0.5, unit="slice", delta=1e-3)  # a slice's epsilon is no patient's: unbounded
    assert math.isinf(ledger.spent())
    (tmp_path / LEDGER_FILE).write_text("{")
    with pytest.raises(ValueError, match="not a privacy ledger"):
        ledger.spent()


def test_the_sites_own_files_do_not_change_its_cache_key(tmp_path):
    """The ledger is written after every DP round, in the site folder: it must not rebuild the cache."""
    site = write_site(tmp_path / "site-01", n_studies=1, shape=(2, 24, 24))
    _, pre = model_from_run_config(run_config(**{"model.image-size": 32}))
    before = inputs_key(site, pre)
    for name in (LEDGER_FILE, ".privacy-ledger.json.lock", ".privacy-ledger.json.tmp", "approved-apps.toml"):
        (site / name).write_text("{}")
    (site / "trusted-entities.yaml").write_text("{}")
    assert inputs_key(site, pre) == before
    folder = next(p for p in sorted(site.rglob("*")) if p.is_dir())
    (folder / "new-input.dcm").write_text("x")  # a real input still does
    assert inputs_key(site, pre) != before


def test_policy_check_and_status_read_the_ledger(tmp_path, capsys):
    """``flwr-client policy check`` tells the site's IT before a run comes that its budget no longer fits."""
    site = write_site(tmp_path / "site-09", n_studies=1, shape=(2, 24, 24))
    (site / "site.toml").write_text('site_id = "site-09"\n[policy]\nmax-lifetime-epsilon = 10.0\n')
    SiteLedger(site / LEDGER_FILE).record("p1", 6.5, unit="patient", delta=1e-5, run="x")
    run = "privacy.dp=true privacy.target-epsilon=4.0"
    assert flwr_client_main(["policy", "check", str(site), "--run-config", run]) == 1
    assert (
        "refused: max-lifetime-epsilon: this site has spent epsilon 6.5 per patient in earlier runs (its privacy "
        "ledger); this run's budget 4 would bring it to 10.5, over its max-lifetime-epsilon 10"
    ) in capsys.readouterr().out
    assert (
        flwr_client_main(["policy", "check", str(site), "--run-config", "privacy.dp=true privacy.target-epsilon=3.5"])
        == 0
    )
    assert flwr_client_main(["status", str(site), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert (
        "privacy ledger (every DP run, per patient): epsilon 6.500 of max-lifetime-epsilon 10, delta 1e-05, 1 run(s)"
        in capsys.readouterr().out
    )


# --- through the ClientApp -----------------------------------------------------------------------


@pytest.fixture
def site(tmp_path) -> dict:
    data = write_site(tmp_path / "data" / "site-07", n_studies=5, shape=(4, 40, 40), seed=7)
    build_site_cache(data, tmp_path / "cache", model_from_run_config(run_config(**DP))[1])
    return {"data-path": str(data), "cache-dir": str(tmp_path / "cache")}


def with_policy(node: dict, text: str) -> None:
    (Path(node["data-path"]) / "site.toml").write_text(f'site_id = "site-07"\n[policy]\n{text}\n')


def train(node: dict, rc: dict, run_name: str, server_round: int = 1):
    """One stage-1 train message of the run ``run_name`` through the ClientApp (its policy mod included)."""
    model = build_joint_model(model_from_run_config(rc)[0], seed=0)
    order = TrainInstruction(server_round=server_round, stage=1, lr=1e-3, local_steps=2, run_name=run_name)
    content = RecordDict({ARRAYS: state_to_record(half_state_dict(model, "unet")), CONFIG: order.to_record()})
    reply = app(make_message(content, MessageType.TRAIN), make_context(node, rc))
    assert not reply.has_error()
    return reply


def refused_rules(reply) -> list[str]:
    assert set(reply.content.keys()) == {SITE, REFUSAL}, "a refusal holds the site and the rules, nothing else"
    return list(reply.content[REFUSAL][REFUSAL_RULES])


def test_a_large_delta_is_refused_when_the_plan_is_made(site):
    """privacy.delta 0.5 on a site without any [policy]: refused by the default bound (1 / its training
    patients), with the refusal reply, before any training."""
    reply = train(site, run_config(**{**DP, "privacy.delta": 0.5}), "big-delta")
    assert refused_rules(reply) == ["max-delta"]
    (reason,) = reply.content[REFUSAL][REFUSAL_REASONS]
    assert reason.startswith("delta 0.5 of the run exceeds this site's bound") and "training patients" in reason
    assert not (Path(site["data-path"]) / LEDGER_FILE).exists()  # nothing trained, nothing spent


def test_lifetime_ledger_across_two_runs_with_different_names(site):
    """Run "a" spends; run "b" (another name: a fresh per-run budget) is refused when its budget no
    longer fits beside what "a" spent, and counted beside it when it does."""
    rc = run_config(**DP)
    with_policy(site, "max-lifetime-epsilon = 100.0")
    first = train(site, rc, "a")
    spent_a = first.content[METRICS][PRIVACY_EPSILON]
    assert first.content[METRICS][PRIVACY_EXHAUSTED] == 0 and 0 < spent_a <= 2.0  # trained (its Poisson batches
    # may all have been empty: DP-SGD's noisy steps count whatever they drew)

    ledger_file = Path(site["data-path"]) / LEDGER_FILE  # in the site folder, not in the run's
    entries = json.loads(ledger_file.read_text())["entries"]
    ((plan, entry),) = entries.items()
    assert len(plan) == 32 and entry["run"] == "a"  # keyed by the plan id the site drew; the name is a label
    assert entry["unit"] == "patient" and entry["epsilon"] == pytest.approx(spent_a)

    with_policy(site, f"max-lifetime-epsilon = {spent_a + 2.0 - 0.01}")
    hello = RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 1})})
    refused_hello = app(make_message(hello, f"query.{HELLO_ACTION}"), make_context(site, {**rc, "output.name": "b"}))
    assert refused_rules(refused_hello) == ["max-lifetime-epsilon"]
    refused = train(site, rc, "b")
    assert refused_rules(refused) == ["max-lifetime-epsilon"]
    (reason,) = refused.content[REFUSAL][REFUSAL_REASONS]
    assert f"spent epsilon {spent_a:.4g} per patient in earlier runs" in reason and "budget 2 would bring it" in reason

    with_policy(site, f"max-lifetime-epsilon = {spent_a + 2.0 + 0.01}")
    second = train(site, rc, "b")
    spent_b = second.content[METRICS][PRIVACY_EPSILON]
    assert second.content[METRICS][PRIVACY_EXHAUSTED] == 0 and spent_b > 0
    ledger = SiteLedger(ledger_file)
    assert len(ledger.entries()) == 2 and ledger.spent() == pytest.approx(spent_a + spent_b)

    # deleting the runs' own folders (a cache cleared, or new names) forgets nothing
    shutil.rmtree(Path(site["cache-dir"]) / "federation")
    assert SiteLedger(ledger_file).spent() == pytest.approx(spent_a + spent_b)
