"""The site policy enforced around every handler: a Flower mod of the site's ClientApp.

Before a handler runs, the app's identity, the run config and the message are checked against
``site.toml`` ``[policy]`` (``client.federation.policy``), read again at every message so that the
site's IT can change it between rounds. A message outside the policy gets a refusal reply naming
the rules (``common.records.REFUSAL``) and nothing else: no training, no arrays, no metrics. The
reply of an accepted message is checked too (``min-examples``) and loses every metric key
``allowed-metrics`` does not list. The site's log says the same as the refusal.

The DP rules that need the site's data are checked inside the train handler, where its patients are
counted (``max-delta``, ``max-lifetime-epsilon`` at the plan: ``client.federation.site_ledger``); a
``PolicyRefusal`` raised there gets the same refusal reply. ``max-lifetime-epsilon`` is also checked
here, against the site's ledger, so that a run that cannot fit is refused at its first message.

This mod runs inside the app the coordinator ships: it constrains an honest coordinator's run config,
not the coordinator's code. Which code runs is decided outside the app, by the SuperNode
(``client.site_tools.approved_supernode``, docs/site-policy.md).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from logging import ERROR, INFO, WARNING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from client.federation.app_identity import app_identities
from client.federation.errors import SiteError, site_errors
from client.federation.exchange import site_record
from client.federation.node import SiteNode
from client.federation.policy import (
    PolicyRefusal,
    SitePolicy,
    Violation,
    allowed_metric_keys,
    check_app,
    check_lifetime,
    check_message,
    check_reply,
    check_run,
    read_policy,
)
from client.federation.site_ledger import SiteBudget, own_plan
from client.federation.site_run import SiteRunConfig
from client.federation.store import SiteStore
from common.records import CONFIG, METRICS, NUM_EXAMPLES, REFUSAL, REFUSAL_REASONS, REFUSAL_RULES, RUN_NAME, SITE


def site_policy(site: SiteNode) -> SitePolicy:
    """The site's policy; a broken ``site.toml`` is logged in full here and sent as a bare refusal
    (its text holds the site's path)."""
    try:
        return read_policy(site.data_path)
    except (OSError, ValueError):
        log(ERROR, "site policy unreadable:\n%s", traceback.format_exc())
        raise SiteError("this site's policy (site.toml [policy]) is unreadable; details in the site's log") from None


def violations_before(msg: Message, policy: SitePolicy, run: SiteRunConfig, site: SiteNode) -> list[Violation]:
    """Every rule the app, the run and the message break, before anything is computed."""
    config = msg.content[CONFIG] if CONFIG in msg.content else {}
    return (
        check_app(policy, app_identities())
        + check_run(policy, run.config)
        + lifetime_violations(policy, run, site, str(config.get(RUN_NAME, "") or run.config.output.name))
        + check_message(policy, msg.metadata.message_type, config)
    )


def lifetime_violations(policy: SitePolicy, run: SiteRunConfig, site: SiteNode, run_name: str) -> list[Violation]:
    """``max-lifetime-epsilon`` against the site's ledger: the run's whole budget must fit beside what
    every other run spent (this run's own entry, found by the plan id in its folder, is not counted
    twice). Runs without per-patient DP are refused by ``check_run`` already."""
    privacy = run.config.privacy
    if not (policy.max_lifetime_epsilon and privacy.dp and privacy.unit == "patient"):
        return []
    ledger = SiteBudget.for_site(site, policy).ledger
    try:
        spent = ledger.spent(excluding=own_plan(SiteStore.for_run(site, run_name).root))
    except (OSError, ValueError):
        log(ERROR, "site privacy ledger unreadable:\n%s", traceback.format_exc())
        raise SiteError("this site's privacy ledger is unreadable; details in the site's log") from None
    return check_lifetime(policy, privacy.target_epsilon, spent)


def refusal(msg: Message, site: SiteNode, violations: list[Violation]) -> Message:
    """The only reply a refused message gets: who refuses, and which rules."""
    log(
        WARNING,
        "site %s refuses %s (site policy): %s",
        site.site_id,
        msg.metadata.message_type,
        "; ".join(map(str, violations)),
    )
    record = ConfigRecord(
        {REFUSAL_RULES: [v.rule for v in violations], REFUSAL_REASONS: [v.reason for v in violations]}
    )
    return Message(RecordDict({SITE: site_record(site), REFUSAL: record}), reply_to=msg)


def filter_reply(reply: Message, policy: SitePolicy, site: SiteNode) -> Message:
    """``reply`` with only the metric keys the policy lets leave (logged by name when some are kept back)."""
    for name, record in list(reply.content.metric_records.items()):
        kept, dropped = allowed_metric_keys(policy, record.keys())
        if dropped:
            log(INFO, "site %s: %s kept back by allowed-metrics: %s", site.site_id, name, ", ".join(dropped))
            reply.content[name] = MetricRecord({k: record[k] for k in kept})
    return reply


def policy_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The Flower mod: refuse what the policy forbids; otherwise run the handler and filter its reply.
    Its own failures reach the server by type only, as the handlers' do (``site_errors``)."""
    return site_errors("site policy")(lambda m, c: _guarded(m, c, call_next))(msg, context)


def _guarded(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    run = SiteRunConfig.from_run_config(context.run_config)
    site = SiteNode.from_context(context, run.config.data)
    policy = site_policy(site)
    if broken := violations_before(msg, policy, run, site):
        return refusal(msg, site, broken)
    try:
        reply = call_next(msg, context)
    except PolicyRefusal as exc:  # a rule only the handler could check (the site's patients, its ledger)
        return refusal(msg, site, exc.violations)
    if reply.has_error():
        return reply
    metrics = reply.content.metric_records.get(METRICS)
    if broken := check_reply(policy, float(metrics[NUM_EXAMPLES]) if metrics and NUM_EXAMPLES in metrics else None):
        return refusal(msg, site, broken)
    return filter_reply(reply, policy, site)
