"""The site policy (``client.federation.policy``): parsing, every rule, and its enforcement by the
ClientApp's mod (``client.federation.guard``) on real handler calls: a refused message gets a refusal
naming the rule and nothing else; metric keys outside ``allowed-metrics`` never leave."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict

from client.client_app import app
from client.data.cache import build_site_cache
from client.federation.app_identity import APP_ROOT, app_identities, code_digest, fab_prefix
from client.federation.policy import (
    PROTOCOL_METRICS,
    SitePolicy,
    allowed_metric_keys,
    check_app,
    check_message,
    check_reply,
    check_run,
    describe,
    parse_policy,
    read_policy,
)
from common.model import build_joint_model, half_state_dict
from common.records import (
    ARRAYS,
    CONFIG,
    HELLO_ACTION,
    METRICS,
    NUM_EXAMPLES,
    REFUSAL,
    REFUSAL_RULES,
    SERVER_ROUND,
    SITE,
    SITE_ID,
    EvaluateInstruction,
    state_to_record,
)
from common.run_config import model_from_run_config, parse_run_config
from tests.helpers.data import write_site
from tests.helpers.flower import make_context, make_message, run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = run_config(**{"model.image-size": 32, "train.local-steps": 1, "train.batch-size": 4})


def cfg(**overrides):
    return parse_run_config(run_config(**overrides))


# --- pure rules ------------------------------------------------------------------------------


def test_defaults_accept_the_default_run():
    assert check_run(SitePolicy(), cfg()) == []
    assert check_app(SitePolicy(), app_identities()) == []
    assert check_message(SitePolicy(), "train", {SERVER_ROUND: 99}) == []


def test_parse_types_and_unknown_rules():
    policy = parse_policy({"require-dp": True, "max-epsilon": 4, "allowed-metrics": ["dice"], "max-rounds": 6})
    assert policy.require_dp and policy.max_epsilon == 4.0 and policy.allowed_metrics == ("dice",)
    with pytest.raises(ValueError, match=r"\[policy\] has no rule 'require_dp'"):
        parse_policy({"require_dp": True})
    with pytest.raises(ValueError, match=r"\[policy\] require-dp must be bool, got 'yes'"):
        parse_policy({"require-dp": "yes"})
    with pytest.raises(ValueError, match=r"max-rounds must be >= 0"):
        parse_policy({"max-rounds": -1})


def test_read_policy_from_site_toml(tmp_path):
    assert read_policy(tmp_path) == SitePolicy()
    (tmp_path / "site.toml").write_text('site_id = "a"\n[policy]\nrequire-secure-counts = true\n')
    assert read_policy(tmp_path) == SitePolicy(require_secure_counts=True)
    (tmp_path / "site.toml").write_text("[policy\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        read_policy(tmp_path)


@pytest.mark.parametrize(
    ("policy", "overrides", "rule"),
    [
        (SitePolicy(require_dp=True), {}, "require-dp"),
        (SitePolicy(max_epsilon=4.0), {}, "max-epsilon"),  # no DP: epsilon infinite
        (SitePolicy(max_epsilon=4.0), {"privacy.dp": True, "privacy.target-epsilon": 8.0}, "max-epsilon"),
        (SitePolicy(allow_imbalance_head=False), {"strategy.imbalance-head": True}, "allow-imbalance-head"),
        (SitePolicy(require_secure_counts=True), {}, "require-secure-counts"),
        (
            SitePolicy(allow_gan_sharing=False),
            {"rounds.gan": 2, "gan.augment-ratio": 0.5, "rounds.stage2": 1},
            "allow-gan-sharing",
        ),
        (SitePolicy(max_rounds=4), {"rounds.stage1": 3, "rounds.stage2": 2}, "max-rounds"),
    ],
)
def test_each_run_rule_refuses(policy, overrides, rule):
    assert [v.rule for v in check_run(policy, cfg(**overrides))] == [rule]


@pytest.mark.parametrize(
    ("policy", "overrides"),
    [
        (SitePolicy(require_dp=True, max_epsilon=4.0), {"privacy.dp": True, "privacy.target-epsilon": 4.0}),
        (SitePolicy(require_secure_counts=True), {"privacy.secure-counts": True}),
        (SitePolicy(allow_gan_sharing=False), {"gan.augment-ratio": 0.5}),  # per-site GANs (design ii) stay home
        (SitePolicy(max_rounds=5), {"rounds.stage1": 3, "rounds.stage2": 2}),
    ],
)
def test_runs_within_the_rules_pass(policy, overrides):
    assert check_run(policy, cfg(**overrides)) == []


def test_message_and_reply_rules():
    assert [v.rule for v in check_message(SitePolicy(max_rounds=2), "train", {SERVER_ROUND: 3})] == ["max-rounds"]
    assert [v.rule for v in check_message(SitePolicy(allow_census=False), "query.census", {})] == ["allow-census"]
    assert [v.rule for v in check_reply(SitePolicy(min_examples=10), 9)] == ["min-examples"]
    assert check_reply(SitePolicy(min_examples=10), 0) == [] and check_reply(SitePolicy(min_examples=10), 10) == []


def test_metric_allow_list_keeps_protocol_keys():
    keys = ["dice", "auc", "label-pos", *PROTOCOL_METRICS]
    kept, dropped = allowed_metric_keys(SitePolicy(allowed_metrics=("dice",)), keys)
    assert set(kept) == {"dice", *PROTOCOL_METRICS} and set(dropped) == {"auc", "label-pos"}
    assert allowed_metric_keys(SitePolicy(), keys) == (keys, [])


def test_app_allow_list(tmp_path):
    mine = app_identities()
    code = next(i for i in mine if i.startswith("code:"))
    assert check_app(SitePolicy(allowed_apps=(code,)), mine) == []
    refused = check_app(SitePolicy(allowed_apps=("code:" + "0" * 64,)), mine)
    assert [v.rule for v in refused] == ["allowed-apps"] and code in refused[0].reason
    # a FAB hash listed in full matches the 8-character prefix Flower keeps in the install folder
    full = "fab:3f2a9c1d" + "e" * 56
    assert check_app(SitePolicy(allowed_apps=(full,)), ("fab:3f2a9c1d",)) == []
    assert check_app(SitePolicy(allowed_apps=(full,)), ("fab:00000000",)) != []


def test_code_digest_follows_the_code(tmp_path):
    for pkg in ("client", "common"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "a.py").write_text("x = 1\n")
    first = code_digest(tmp_path)
    assert first == code_digest(tmp_path)
    (tmp_path / "client" / "a.py").write_text("x = 2\n")
    assert code_digest(tmp_path) != first
    apps = tmp_path / "apps" / "hemexp.hemexp.0.1.0.3f2a9c1d"
    apps.mkdir(parents=True)
    assert fab_prefix(apps) == "3f2a9c1d" and fab_prefix(APP_ROOT) == ""


def test_describe_marks_defaults():
    rows = {rule: (value, default) for rule, value, default in describe(SitePolicy(max_rounds=3))}
    assert rows["max-rounds"] == (3, False) and rows["require-dp"] == (False, True)
    assert not math.isnan(rows["census-min-count"][0])


# --- enforcement at the ClientApp ----------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("policy")
    data = write_site(root / "data" / "site-05", n_studies=5, shape=(4, 40, 40), seed=5)
    build_site_cache(data, root / "cache", model_from_run_config(RUN)[1])
    return {"data-path": str(data), "cache-dir": str(root / "cache")}


def with_policy(node: dict, text: str) -> None:
    toml = Path(node["data-path"]) / "site.toml"
    head = toml.read_text().split("[policy]")[0] if toml.is_file() else 'site_id = "site-05"\n'
    toml.write_text(head + ("[policy]\n" + text if text else ""))


def evaluate_message() -> RecordDict:
    model = build_joint_model(model_from_run_config(RUN)[0], seed=0)
    order = EvaluateInstruction(server_round=1, stage=1, run_name="t")
    return RecordDict({ARRAYS: state_to_record(half_state_dict(model, "unet")), CONFIG: order.to_record()})


def test_refusal_names_the_rule_and_nothing_else_leaves(site, caplog):
    with_policy(site, "require-dp = true\nmax-rounds = 2\n")
    try:
        with caplog.at_level(logging.WARNING):
            reply = app(make_message(evaluate_message(), MessageType.EVALUATE), make_context(site, RUN))
    finally:
        with_policy(site, "")
    assert not reply.has_error()
    assert set(reply.content.keys()) == {SITE, REFUSAL}
    assert list(reply.content[REFUSAL][REFUSAL_RULES]) == ["require-dp", "max-rounds"]
    assert reply.content[SITE][SITE_ID] == "site-05"
    assert "site site-05 refuses evaluate (site policy): require-dp" in caplog.text


def test_unlisted_app_is_refused(site):
    with_policy(site, f'allowed-apps = ["code:{"0" * 64}"]\n')
    try:
        hello = RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 1})})
        reply = app(make_message(hello, f"query.{HELLO_ACTION}"), make_context(site, RUN))
    finally:
        with_policy(site, "")
    assert list(reply.content[REFUSAL][REFUSAL_RULES]) == ["allowed-apps"]


def test_listed_app_is_served(site):
    code = next(i for i in app_identities() if i.startswith("code:"))
    with_policy(site, f'allowed-apps = ["{code}"]\n')
    try:
        hello = RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 1})})
        reply = app(make_message(hello, f"query.{HELLO_ACTION}"), make_context(site, RUN))
    finally:
        with_policy(site, "")
    assert set(reply.content.keys()) == {METRICS, SITE} and not reply.content[METRICS]


def test_metric_keys_outside_the_policy_never_leave(site):
    reply = app(make_message(evaluate_message(), MessageType.EVALUATE), make_context(site, RUN))
    everything = set(reply.content[METRICS].keys())
    assert {"dice", NUM_EXAMPLES} < everything
    with_policy(site, 'allowed-metrics = ["dice"]\n')
    try:
        reply = app(make_message(evaluate_message(), MessageType.EVALUATE), make_context(site, RUN))
    finally:
        with_policy(site, "")
    assert set(reply.content[METRICS].keys()) == {"dice", NUM_EXAMPLES}


def test_min_examples_refuses_the_reply(site):
    with_policy(site, "min-examples = 100000\n")
    try:
        reply = app(make_message(evaluate_message(), MessageType.EVALUATE), make_context(site, RUN))
    finally:
        with_policy(site, "")
    assert set(reply.content.keys()) == {SITE, REFUSAL}
    assert list(reply.content[REFUSAL][REFUSAL_RULES]) == ["min-examples"]


def test_broken_policy_is_refused_without_its_path(site):
    with_policy(site, "require-dp = 3\n")
    try:
        with pytest.raises(Exception) as info:
            app(make_message(evaluate_message(), MessageType.EVALUATE), make_context(site, RUN))
    finally:
        with_policy(site, "")
    assert "policy" in str(info.value) and site["data-path"] not in str(info.value)
