"""``flwr-client status`` and ``flwr-client policy show|check``: what a site holds and accepts, for
its IT and data-protection officer. Everything here reads the site's own disk and prints; nothing is sent.

What a site holds: its caches (``client.data.cache``: one folder per preprocessing), the runs it took
part in and the privacy budget each one spent (``client.federation.store``, ``privacy.json``), its
policy (``client.federation.policy``) and the identities of the app it would run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.federation.policy import SitePolicy, Violation, check_app, check_lifetime, check_run, describe
from client.federation.site_ledger import SiteLedger, ledger_path
from client.ingest.layouts import site_layout
from client.ingest.site_settings import read_site_settings
from common.run_config import RunConfig

PRIVACY_FILE = "privacy.json"  # client.training.privacy.PRIVACY_FILE, read here without importing Opacus


@dataclass(frozen=True)
class CacheInfo:
    folder: str
    size: int
    n_studies: int
    n_slices: int
    preprocess: dict[str, Any]


@dataclass(frozen=True)
class RunInfo:
    name: str
    files: int
    epsilon: float | None  # privacy budget spent in that run (None: it trained without DP-SGD)
    rounds: int  # DP rounds recorded (0 without DP)


def site_caches(cache_dir: Path, site_id: str) -> list[CacheInfo]:
    """The site's caches under ``cache_dir`` (``<site id>-<key>/index.json``)."""
    out = []
    for index in sorted(Path(cache_dir).glob(f"{site_id}-*/index.json")):
        data = json.loads(index.read_text())
        out.append(
            CacheInfo(
                index.parent.name, int(data["size"]), int(data["n_studies"]), int(data["n_slices"]), data["preprocess"]
            )
        )
    return out


def site_runs(cache_dir: Path, site_id: str) -> list[RunInfo]:
    """The runs this site kept state for (``<cache dir>/federation/<site id>/<run>/``) and their DP budget."""
    root = Path(cache_dir) / "federation" / site_id
    out = []
    for run in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        ledger = run / PRIVACY_FILE
        rounds = json.loads(ledger.read_text()).get("rounds", []) if ledger.is_file() else []
        epsilon = float(rounds[-1]["epsilon"]) if rounds else None
        out.append(RunInfo(run.name, sum(1 for f in run.iterdir() if f.is_file()), epsilon, len(rounds)))
    return out


def format_policy(policy: SitePolicy, identities: tuple[str, ...]) -> str:
    """Every rule with its effective value (``(default)`` where site.toml leaves it), then this app's identities."""
    lines = ["policy (site.toml [policy]):"]
    for rule, value, default in describe(policy):
        shown = "every key" if value is None else (list(value) if isinstance(value, tuple) else value)
        lines.append(f"  {rule:24s} {shown!s}{'  (default)' if default else ''}")
    lines.append("this app (list one of these under allowed-apps to pin it):")
    lines += [f"  {i}" for i in identities]
    return "\n".join(lines)


def policy_verdict(
    policy: SitePolicy, cfg: RunConfig, identities: tuple[str, ...], spent: float = 0.0
) -> list[Violation]:
    """What the site's ClientApp would refuse of this run, before any message (``client.federation.guard``);
    ``spent``: the per-patient epsilon in the site's privacy ledger (``max-lifetime-epsilon``)."""
    lifetime = (
        check_lifetime(policy, cfg.privacy.target_epsilon, spent)
        if cfg.privacy.dp and cfg.privacy.unit == "patient"
        else []
    )
    return check_app(policy, identities) + check_run(policy, cfg) + lifetime


def site_spent(site_dir: Path, policy: SitePolicy) -> tuple[float, float, int]:
    """(per-patient epsilon, delta, runs) of the site's lifetime privacy ledger (``client.federation.site_ledger``)."""
    ledger = SiteLedger(ledger_path(site_dir, policy))
    return ledger.spent(), ledger.delta(), len(ledger.entries())


def format_status(site_dir: Path, cache_dir: Path, policy: SitePolicy, identities: tuple[str, ...]) -> str:
    site = read_site_settings(site_dir)
    lines = [f"site {site.site_id} ({site.name}), layout {site_layout(site_dir) or 'none: not a site folder'}"]
    caches = site_caches(cache_dir, site.site_id)
    lines.append(f"caches in {cache_dir}: {len(caches) or 'none (run flwr-client prepare)'}")
    for c in caches:
        steps = ", ".join(k for k in ("denoise", "strip_skull", "centre") if c.preprocess.get(k))
        lines.append(f"  {c.folder}: {c.n_studies} studies, {c.n_slices} slices, {c.size}x{c.size}, steps: {steps}")
    runs = site_runs(cache_dir, site.site_id)
    lines.append(f"runs taken part in: {len(runs) or 'none'}")
    for r in runs:
        budget = f"epsilon {r.epsilon:.3f} spent over {r.rounds} DP round(s)" if r.epsilon is not None else "no DP-SGD"
        lines.append(f"  {r.name}: {r.files} file(s) kept, {budget}")
    epsilon, delta, n = site_spent(site_dir, policy)
    bound = f" of max-lifetime-epsilon {policy.max_lifetime_epsilon:g}" if policy.max_lifetime_epsilon else ""
    lines.append(
        f"privacy ledger (every DP run, per patient): epsilon {epsilon:.3f}{bound}, delta {delta:.3g}, {n} run(s)"
    )
    lines.append(format_policy(policy, identities))
    return "\n".join(lines)
