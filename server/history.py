"""Per-round metrics of a federated run: per site and aggregated, as JSON and as a long CSV table.

``history.json``: ``{"run": {...}, "rounds": [{"round", "stage", "seconds", "train": {"aggregated": {...},
"sites": {site: {...}}}, "evaluate": {...}, "failures": [{"phase", "site", "node", "reason", "phases", "seconds"}],
"rejected": [{"phase", "site", "node", "rule", "key", "reason", "problems", "n_problems"}],
"capped": [{"site", "node", "key", "weight"}]}]}``; ``rejected`` lists the replies the server refused
because they broke a rule of ``server.validation`` (the first rule and key, up to five problems as
``{"rule", "key"}``, never a value; nothing else of such a reply is kept), ``capped`` the train replies
whose ``num-examples`` was bounded and the weight each got (rounds written before these keys existed
lack them);
stage-2 rounds add ``"label-counts": {"pos", "neg", "pos-weight"}`` (the global sums and weights), and a
round whose aggregation was skipped (too few good replies) has ``"skipped": true``. ``stage`` is 1, 2 or
``"gan"`` (a round of the federated GAN stage, ``rounds.gan``: its ``train`` holds the G and D replies'
scalars, its ``evaluate`` is empty). ``bytes``: ``{site: {"sent", "received"}}``, the payload bytes the
round exchanged with each site, every phase together (``server.validation.content_bytes``: array
payloads, keys and 8 bytes a number; not the wire's framing).
``failures`` holds one entry per site and round: the first phase it failed in and why ("refused by
site policy: ..." for a refusal), ``phases`` every phase it failed in that round, ``seconds`` how long
after the exchange started the failure was seen (the timeout for a site that never answered).
``metrics.csv``: one row per (round, stage, phase, site, metric, value); ``site`` is ``all`` for the
aggregate. Both are rewritten atomically after every round, so a crash leaves the last good round.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSON_FILE = "history.json"
CSV_FILE = "metrics.csv"
CSV_COLUMNS = ("round", "stage", "phase", "site", "metric", "value")


@dataclass
class History:
    """The run's rounds so far; ``load`` continues a resumed run, ``save`` writes both files."""

    out_dir: Path
    run: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, out_dir: Path, up_to_round: int | None = None) -> History:
        """The saved history, without rounds after ``up_to_round`` (a resumed run redoes them)."""
        path = Path(out_dir) / JSON_FILE
        if not path.is_file():
            return cls(Path(out_dir))
        data = json.loads(path.read_text())
        rounds = [r for r in data.get("rounds", []) if up_to_round is None or r["round"] <= up_to_round]
        return cls(Path(out_dir), data.get("run", {}), rounds)

    def add_round(self, entry: dict[str, Any]) -> None:
        self.rounds = [r for r in self.rounds if r["round"] != entry["round"]] + [entry]

    def rows(self) -> list[dict[str, Any]]:
        """The long table: every scalar metric of every site and of the aggregate, every round."""
        out = []
        for r in self.rounds:
            for phase in ("train", "evaluate"):
                block = r.get(phase) or {}
                sources = [("all", block.get("aggregated") or {})] + sorted((block.get("sites") or {}).items())
                for site, metrics in sources:
                    for metric, value in metrics.items():
                        if isinstance(value, list):
                            out += [
                                dict(
                                    round=r["round"],
                                    stage=r["stage"],
                                    phase=phase,
                                    site=site,
                                    metric=f"{metric}/{i}",
                                    value=v,
                                )
                                for i, v in enumerate(value)
                            ]
                        else:
                            out.append(
                                dict(
                                    round=r["round"],
                                    stage=r["stage"],
                                    phase=phase,
                                    site=site,
                                    metric=metric,
                                    value=value,
                                )
                            )
        return out

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(
            self.out_dir / JSON_FILE, json.dumps({"run": self.run, "rounds": self.rounds}, indent=1, default=_plain)
        )
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows())
        _write_atomic(self.out_dir / CSV_FILE, buf.getvalue())


def _plain(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (no positives at a site) is written as null."""
    return None if isinstance(value, float) and math.isnan(value) else value
