"""The data census on the server (``rounds.census``, ``common.census``): ask every site for its
guarded summary statistics before any training, pool them (sums: every statistic is a count), and
write ``census.json`` and ``census.html`` (``server.census_report``) beside the run's history, so the
coordinator sees how the sites differ (scanner, slice thickness, HU inside the brain, hematoma
volume, marker prevalence, missing labels) without seeing one image."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.logger import log

from common.census import BINNED, CENSUS, CENSUS_ACTION, SCANNER, SCANNER_NAMES, SLICES, STUDIES, SUPPRESSED
from common.records import SITE, SITE_ID
from server.replies import action_queries

Exchange = Callable[[str, list[Message]], list[Message]]


def site_census(record: Mapping[str, Any]) -> dict[str, Any]:
    """One site's CENSUS record as plain lists; the scanner as ``{name: count}``."""
    out: dict[str, Any] = {k: [int(v) for v in record[k]] for k in (*BINNED, STUDIES, SLICES)}
    out[SCANNER] = dict(zip((str(n) for n in record[SCANNER_NAMES]), (int(v) for v in record[SCANNER])))
    out[SUPPRESSED] = [str(s) for s in record.get(SUPPRESSED, [])]
    return out


def pool_census(sites: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The pooled census: every binned count summed over the sites, scanners by name."""
    pooled: dict[str, Any] = {
        k: [sum(col) for col in zip(*(s[k] for s in sites.values()))] if sites else [0] * len(BINNED.get(k, [0]))
        for k in (*BINNED, STUDIES, SLICES)
    }
    scanners: dict[str, int] = {}
    for s in sites.values():
        for name, n in s[SCANNER].items():
            scanners[name] = scanners.get(name, 0) + n
    pooled[SCANNER] = dict(sorted(scanners.items()))
    pooled[SUPPRESSED] = sorted({f"{site}: {b}" for site, s in sites.items() for b in s[SUPPRESSED]})
    return pooled


def run_census(node_ids: Iterable[int], exchange: Exchange, server_round: int = 0) -> dict[str, Any]:
    """Ask every node for its census; ``{"sites": {site id: census}, "pooled": census}``."""
    messages = action_queries(node_ids, CENSUS_ACTION, server_round, "census")
    replies = [r for r in exchange("census", messages) if CENSUS in r.content]
    sites = {str(r.content[SITE][SITE_ID]): site_census(r.content[CENSUS]) for r in replies}
    if not sites:
        log(WARNING, "census: no site replied")
    else:
        log(INFO, "census: %d site(s), %d studies in all", len(sites), sum(s[STUDIES][0] for s in sites.values()))
    return {"sites": dict(sorted(sites.items())), "pooled": pool_census(sites)}


def write_census(out_dir: Path, census: Mapping[str, Any]) -> Path:
    """``census.json`` and ``census.html`` in ``out_dir``; returns the HTML's path."""
    from server.census_report import write_census_files  # matplotlib only when a census is written

    return write_census_files(Path(out_dir), census)
