"""The site's lifetime privacy ledger: what every DP run ever spent at this site, kept with its data.

A run's own accounting (``client.training.privacy.PrivacyLedger``, ``privacy.json``) lives in the
run's folder, which is named after the run name the server sends: a new name starts a new folder
and a new budget. This ledger is the site's, so a site's total loss has a bound whatever the server
names its runs:

- **Where**: ``privacy-ledger.json`` in the site folder (or ``[policy] privacy-ledger``), beside
  ``site.toml``; never in the cache, which may be cleared and rebuilt.
- **Keyed by** a plan id the site draws itself when a run's DP plan is made (kept in that run's
  ``privacy.json``), never by a name the server sends: reusing a name continues that plan's entry
  (its spend only grows), a new name opens a new entry, and both count.
- **When**: written after a round's training and before its reply, together with ``privacy.json``,
  so that every release is counted; an entry's epsilon only ever grows.
- **How runs add up**: basic composition, per patient. Runs of (eps_i, delta_i)-DP together are
  (sum eps_i, sum delta_i)-DP. Valid for any runs, loose (RDP over the runs' histories would be tighter).
  An entry accounted per slice counts as infinite: its per-patient loss is unknown.

Not covered: runs without DP-SGD (nothing is accounted: ``max-lifetime-epsilon`` refuses them), and
anything outside DP-SGD's guarantee (label counts, metrics: docs/privacy.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.federation.node import SiteNode
from client.federation.policy import PolicyRefusal, SitePolicy, Violation, check_delta, check_lifetime

#: The ledger's file in the site folder (one of ``client.ingest.site_settings.SITE_FILES``).
LEDGER_FILE = "privacy-ledger.json"
#: A run's own accounting in its folder (``client.training.privacy.PRIVACY_FILE``; read here as JSON).
RUN_PRIVACY_FILE = "privacy.json"
FORMAT = 1


def ledger_home(site: SiteNode) -> Path:
    """The site folder; for a simulation's prebuilt partition cache, the site's folder in the cache dir."""
    return site.data_path if site.cache_path is None else site.cache_dir / "federation" / site.site_id


def ledger_path(site_dir: Path, policy: SitePolicy) -> Path:
    """``[policy] privacy-ledger`` (relative to the site folder), else ``privacy-ledger.json`` in it."""
    if policy.privacy_ledger:
        path = Path(policy.privacy_ledger).expanduser()
        return path if path.is_absolute() else Path(site_dir) / path
    return Path(site_dir) / LEDGER_FILE


@dataclass(frozen=True)
class SiteLedger:
    """The ledger file: ``{"format": 1, "entries": {plan id: {unit, epsilon, delta, ...}}}``."""

    path: Path

    def entries(self) -> dict[str, dict[str, Any]]:
        """Every run's entry (none when the file does not exist yet); a malformed file is a ValueError."""
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            entries = data["entries"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path}: not a privacy ledger ({exc})") from None
        if not isinstance(entries, dict):
            raise ValueError(f"{self.path}: not a privacy ledger (entries must be a table)")
        return entries

    def spent(self, excluding: str = "") -> float:
        """Per-patient epsilon of every entry but ``excluding``, summed (inf when one is per slice)."""
        total = 0.0
        for plan, entry in self.entries().items():
            if plan == excluding or not float(entry.get("epsilon", 0.0)) > 0:
                continue
            if entry.get("unit") != "patient":
                return math.inf
            total += float(entry["epsilon"])
        return total

    def delta(self) -> float:
        """Delta of every entry that spent something, summed (basic composition)."""
        return sum(float(e.get("delta", 0.0)) for e in self.entries().values() if float(e.get("epsilon", 0.0)) > 0)

    def record(self, plan: str, epsilon: float, **facts: Any) -> None:
        """Set ``plan``'s spend to ``epsilon`` (never lower than recorded before) and its ``facts``,
        under a lock and by an atomic replace (two SuperNodes may share a site folder)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            entries = self.entries()
            now = datetime.now(UTC).isoformat(timespec="seconds")
            entry = entries.get(plan, {"first": now})
            entry.update(facts)
            entry["epsilon"] = max(float(entry.get("epsilon", 0.0)), float(epsilon))
            entry["last"] = now
            entries[plan] = entry
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps({"format": FORMAT, "entries": entries}, indent=1, sort_keys=True))
            tmp.replace(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on ``.NAME.lock`` beside the ledger (POSIX; elsewhere unlocked)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def own_plan(run_dir: Path) -> str:
    """The plan id of the run whose folder is ``run_dir`` ("" before its first DP round)."""
    path = Path(run_dir) / RUN_PRIVACY_FILE
    try:
        return str(json.loads(path.read_text()).get("plan_id", "")) if path.is_file() else ""
    except ValueError:
        return ""


@dataclass(frozen=True)
class SiteBudget:
    """What the site's policy bounds across and within runs, and the ledger that counts it; what
    ``client.training.privacy.SitePrivacy`` checks when it plans a run and before every round."""

    policy: SitePolicy
    ledger: SiteLedger
    site_id: str

    @classmethod
    def for_site(cls, site: SiteNode, policy: SitePolicy) -> SiteBudget:
        home = ledger_home(site)
        return cls(policy, SiteLedger(ledger_path(home, policy)), site.site_id)

    def check_plan(self, unit: str, delta: float, n_patients: int, target_epsilon: float) -> None:
        """Refuse (``PolicyRefusal``) a run whose resolved delta or whose budget, on top of what the
        site has spent, breaks its policy; checked once, when the run's DP plan is made."""
        broken: list[Violation] = check_delta(self.policy, delta, n_patients)
        if self.policy.max_lifetime_epsilon:
            spent = self.ledger.spent() if unit == "patient" else math.inf
            broken += check_lifetime(self.policy, target_epsilon, spent)
        if broken:
            raise PolicyRefusal(broken)

    def exceeded(self, plan: str, epsilon_after: float) -> bool:
        """Would this run, at ``epsilon_after``, take the site past ``max-lifetime-epsilon`` (the other
        runs counted as spent so far: two runs at once cannot pass it together)?"""
        bound = self.policy.max_lifetime_epsilon
        return bool(bound) and self.ledger.spent(excluding=plan) + epsilon_after > bound * (1 + 1e-9)

    def record(self, plan: str, epsilon: float, *, unit: str, delta: float, target_epsilon: float, run: str) -> None:
        """Count a round's spend (``run``: the run folder's name, a label only, not a key)."""
        self.ledger.record(
            plan, epsilon, site=self.site_id, run=run, unit=unit, delta=delta, target_epsilon=target_epsilon
        )

    def lifetime(self) -> tuple[float, float]:
        """(epsilon per patient, delta) this site has spent over every run, for its log and status."""
        return self.ledger.spent(), self.ledger.delta()
