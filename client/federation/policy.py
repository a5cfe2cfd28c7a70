"""The site's policy (``site.toml`` ``[policy]``): what this hospital accepts of a run, whoever wrote
the run config (docs/site-policy.md).

The rules are pure functions of the policy, the run config, the message and the app's identity;
``client.federation.guard`` applies them before any handler runs and to every reply. A rule that is
not in ``site.toml`` takes its default, which accepts what the project's default run does.

The DP rules are written per **patient**: ``max-epsilon`` and ``max-lifetime-epsilon`` bound what a
patient of this site may lose, so a run accounted per slice (``privacy.unit = "slice"``) is refused
by them (a slice's epsilon says nothing usable about a patient of ~30 slices). ``max-delta`` bounds
delta (default 1 / the site's training patients: ``check_delta``, applied where that count is known,
the DP plan). The lifetime bound sums every run's spend in the site's own ledger
(``client.federation.site_ledger``), never keyed by anything the server sends.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from client.federation.errors import SiteError
from common.records import MASKED_COUNTS, NUM_EXAMPLES, SERVER_ROUND
from common.run_config import PrivacyOptions, RunConfig

#: Metric keys a reply always keeps: without them no strategy can weigh or sum a site's reply, and
#: the masked counts are meaningless alone. ``allowed-metrics`` governs every other key.
PROTOCOL_METRICS = frozenset({NUM_EXAMPLES, MASKED_COUNTS})


@dataclass(frozen=True)
class SitePolicy:
    """``[policy]`` of ``site.toml``; the field ``require_dp`` is the rule ``require-dp``."""

    #: Train only with per-patient DP-SGD (``privacy.dp = true``, ``privacy.unit = "patient"``).
    require_dp: bool = False
    #: Largest per-patient ``privacy.target-epsilon`` of one run; 0: no bound. A bound implies per-patient
    #: DP (no DP is epsilon infinite; a per-slice epsilon is not a patient's).
    max_epsilon: float = 0.0
    #: Largest delta of a run; 0: 1 / the site's training patients (``check_delta``).
    max_delta: float = 0.0
    #: Largest per-patient epsilon summed over every run this site ever trained with DP (its privacy
    #: ledger, ``client.federation.site_ledger``); 0: no bound. A bound implies per-patient DP.
    max_lifetime_epsilon: float = 0.0
    #: Where the site's privacy ledger is kept; "": ``privacy-ledger.json`` in the site folder (a
    #: relative path is taken from the site folder).
    privacy_ledger: str = ""
    #: A reply computed from fewer examples (slices) than this is refused; 0 and replies of 0 examples pass.
    min_examples: int = 0
    #: Metric keys that may leave the site (besides ``PROTOCOL_METRICS``); None: every key.
    allowed_metrics: tuple[str, ...] | None = None
    #: Accept ``strategy.imbalance-head`` (the server then learns each site's positives per label).
    allow_imbalance_head: bool = True
    #: Accept a federated GAN stage (``rounds.gan`` > 0), which sends the site's GAN generator and
    #: discriminator, trained on its hematoma crops, to the server every GAN round (docs/gan.md).
    allow_gan_sharing: bool = True
    #: Accept only runs whose label counts leave the site masked (``privacy.secure-counts``).
    require_secure_counts: bool = False
    #: Most rounds (stage 1 + stage 2) a run may have; 0: no bound.
    max_rounds: int = 0
    #: Apps this site runs (``client.federation.app_identity``): "code:<sha256>", "fab:<hash>",
    #: "version:<version>+<commit>"; empty: any app.
    allowed_apps: tuple[str, ...] = ()
    #: Take part in the data census (``query.census``).
    allow_census: bool = True
    #: Census bins counting fewer studies or slices than this are suppressed (sent as 0).
    census_min_count: int = 5
    #: Laplace noise scale added to every census count before suppression; 0: none.
    census_noise: float = 0.0


@dataclass(frozen=True)
class Violation:
    """One rule a run or a reply breaks: the rule's ``site.toml`` key and why, safe to send."""

    rule: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.reason}"


class PolicyRefusal(SiteError):
    """Raised where a rule can only be checked inside a handler (the site's patient count, its
    ledger): ``client.federation.guard`` turns it into the same refusal reply as a rule broken before."""

    def __init__(self, violations: list[Violation]) -> None:
        super().__init__("; ".join(map(str, violations)))
        self.violations = violations


def rule_name(field_name: str) -> str:
    return field_name.replace("_", "-")


RULES: dict[str, type] = {rule_name(f.name): f.type for f in fields(SitePolicy)}  # rule -> its annotation (as a string)


def parse_policy(table: Mapping[str, Any], source: str = "site.toml") -> SitePolicy:
    """``[policy]`` typed and checked; an unknown rule or a wrong type is a ValueError naming it (a
    typo must not quietly leave a rule at its default)."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in RULES:
            raise ValueError(f"{source}: [policy] has no rule {key!r}; rules: {sorted(RULES)}")
        values[key.replace("-", "_")] = _typed(source, key, value, RULES[key])
    policy = SitePolicy(**values)
    for key in (
        "max_epsilon",
        "max_delta",
        "max_lifetime_epsilon",
        "min_examples",
        "max_rounds",
        "census_min_count",
        "census_noise",
    ):
        if getattr(policy, key) < 0:
            raise ValueError(f"{source}: [policy] {rule_name(key)} must be >= 0, got {getattr(policy, key)}")
    if policy.max_delta >= 1:
        raise ValueError(f"{source}: [policy] max-delta must be < 1, got {policy.max_delta}")
    return policy


def _typed(source: str, key: str, value: Any, kind: str) -> Any:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and number and float(value).is_integer():
        return int(value)
    if kind == "float" and number:
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if "tuple" in kind and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{source}: [policy] {key} must be {kind.replace(' | None', '')}, got {value!r}")


def read_policy(site_dir: Path) -> SitePolicy:
    """The policy of the site folder ``site_dir`` (defaults when it has no ``site.toml`` or no ``[policy]``)."""
    path = Path(site_dir) / "site.toml"
    if not path.is_file():
        return SitePolicy()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from exc
    table = data.get("policy", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: policy must be a table ([policy])")
    return parse_policy(table, str(path))


def check_run(policy: SitePolicy, cfg: RunConfig) -> list[Violation]:
    """The rules the run config breaks (empty: the site takes part). The DP rules that need the
    site's data or ledger are ``check_delta`` and ``check_lifetime``."""
    out = []
    privacy = cfg.privacy
    if policy.require_dp and not privacy.dp:
        out.append(Violation("require-dp", "this site trains only with DP-SGD; the run has privacy.dp = false"))
    elif policy.require_dp and privacy.unit != "patient":
        out.append(Violation("require-dp", _not_per_patient(privacy, "requires DP-SGD per patient")))
    if policy.max_epsilon:
        out += _epsilon_rule("max-epsilon", policy.max_epsilon, privacy)
    if policy.max_lifetime_epsilon:
        out += _epsilon_rule("max-lifetime-epsilon", policy.max_lifetime_epsilon, privacy)
    if privacy.dp and privacy.delta and policy.max_delta and privacy.delta > policy.max_delta:
        out.append(
            Violation(
                "max-delta", f"privacy.delta {privacy.delta:g} exceeds this site's max-delta {policy.max_delta:g}"
            )
        )
    if cfg.strategy.imbalance_head and not policy.allow_imbalance_head:
        out.append(Violation("allow-imbalance-head", "strategy.imbalance-head is not accepted by this site"))
    if cfg.rounds.gan and not policy.allow_gan_sharing:
        out.append(
            Violation(
                "allow-gan-sharing",
                f"the run federates the GAN (rounds.gan = {cfg.rounds.gan}); this site's GAN never leaves the site",
            )
        )
    if policy.require_secure_counts and not privacy.secure_counts:
        out.append(
            Violation("require-secure-counts", "this site sends label counts only masked; privacy.secure-counts is off")
        )
    rounds = cfg.rounds.stage1 + cfg.rounds.gan + cfg.rounds.stage2
    if policy.max_rounds and rounds > policy.max_rounds:
        out.append(
            Violation("max-rounds", f"the run has {rounds} rounds; this site takes part in at most {policy.max_rounds}")
        )
    return out


def _not_per_patient(privacy: PrivacyOptions, what: str) -> str:
    return (
        f"this site {what}; the run accounts privacy per {privacy.unit} (privacy.unit = '{privacy.unit}'), "
        f"whose epsilon {privacy.target_epsilon:g} bounds one {privacy.unit}, not a patient (a patient holds "
        "~30 slices: group privacy multiplies the epsilon by their number)"
    )


def _epsilon_rule(rule: str, bound: float, privacy: PrivacyOptions) -> list[Violation]:
    """A per-patient epsilon bound: no DP is epsilon infinite, another unit cannot be converted."""
    if not privacy.dp:
        return [
            Violation(rule, f"privacy budget inf (privacy.dp off) exceeds this site's {rule} {bound:g} per patient")
        ]
    if privacy.unit != "patient":
        return [Violation(rule, _not_per_patient(privacy, f"bounds epsilon per patient ({rule} {bound:g})"))]
    if privacy.target_epsilon > bound:
        return [
            Violation(
                rule,
                f"privacy budget {privacy.target_epsilon:g} per patient (privacy.target-epsilon) exceeds "
                f"this site's {rule} {bound:g}",
            )
        ]
    return []


def delta_bound(policy: SitePolicy, n_patients: int) -> float:
    """The largest delta this site accepts: ``max-delta``, else 1 / its training patients."""
    return policy.max_delta or 1.0 / max(n_patients, 1)


def check_delta(policy: SitePolicy, delta: float, n_patients: int) -> list[Violation]:
    """The run's delta as the site resolved it (``privacy.delta``, or the default for its
    ``n_patients`` training patients) against ``max-delta``, or 1 / patients when the policy has none.
    A delta near 1 / patients allows publishing one whole patient's record outright."""
    bound = delta_bound(policy, n_patients)
    if delta <= bound:
        return []
    which = f"max-delta {policy.max_delta:g}" if policy.max_delta else f"default 1 / {n_patients} training patients"
    return [Violation("max-delta", f"delta {delta:g} of the run exceeds this site's bound {bound:g} ({which})")]


def check_lifetime(policy: SitePolicy, target_epsilon: float, spent: float) -> list[Violation]:
    """A run whose whole budget ``target_epsilon`` does not fit in what is left of the site's
    ``max-lifetime-epsilon`` after ``spent`` (per patient, every other run in its ledger, summed)."""
    if not policy.max_lifetime_epsilon or spent + target_epsilon <= policy.max_lifetime_epsilon * (1 + 1e-9):
        return []
    return [
        Violation(
            "max-lifetime-epsilon",
            f"this site has spent epsilon {spent:.4g} per patient in earlier runs (its privacy ledger); this run's "
            f"budget {target_epsilon:g} would bring it to {spent + target_epsilon:.4g}, over its "
            f"max-lifetime-epsilon {policy.max_lifetime_epsilon:g}",
        )
    ]


def check_app(policy: SitePolicy, identities: Iterable[str]) -> list[Violation]:
    """Whether the app this process runs is on the site's allow-list (any one of its identities)."""
    if not policy.allowed_apps:
        return []
    mine = set(identities)
    if any(_app_matches(allowed, mine) for allowed in policy.allowed_apps):
        return []
    shown = ", ".join(sorted(i for i in mine if i.startswith("code:")))
    return [Violation("allowed-apps", f"this app ({shown}) is not on the site's allow-list")]


def _app_matches(allowed: str, mine: set[str]) -> bool:
    """An exact identity, or a FAB hash whose prefix is the one Flower keeps in the app's install folder."""
    if allowed in mine:
        return True
    if allowed.startswith("fab:"):
        return any(i.startswith("fab:") and len(i) > 4 and allowed.startswith(i) for i in mine)
    return False


def check_message(policy: SitePolicy, message_type: str, config: Mapping[str, Any]) -> list[Violation]:
    """Rules on the message itself: the round number, and census queries."""
    out = []
    rnd = int(config.get(SERVER_ROUND, 0) or 0)
    if policy.max_rounds and rnd > policy.max_rounds:
        out.append(Violation("max-rounds", f"round {rnd} is past this site's {policy.max_rounds}"))
    if message_type == "query.census" and not policy.allow_census:
        out.append(Violation("allow-census", "this site does not take part in the data census"))
    return out


def check_reply(policy: SitePolicy, num_examples: float | None) -> list[Violation]:
    """Rules on what a reply was computed from."""
    if num_examples is not None and policy.min_examples and 0 < num_examples < policy.min_examples:
        return [
            Violation(
                "min-examples",
                f"the reply was computed from {int(num_examples)} examples; this site sends none from fewer than "
                f"{policy.min_examples}",
            )
        ]
    return []


def allowed_metric_keys(policy: SitePolicy, keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """(kept, dropped) metric keys of a reply under ``allowed-metrics``."""
    keys = list(keys)
    if policy.allowed_metrics is None:
        return keys, []
    allowed = set(policy.allowed_metrics) | PROTOCOL_METRICS
    return [k for k in keys if k in allowed], [k for k in keys if k not in allowed]


def describe(policy: SitePolicy) -> list[tuple[str, Any, bool]]:
    """(rule, effective value, is the default) for every rule, for ``flwr-client policy show``."""
    default = SitePolicy()
    return [
        (rule_name(f.name), getattr(policy, f.name), getattr(policy, f.name) == getattr(default, f.name))
        for f in fields(SitePolicy)
    ]
