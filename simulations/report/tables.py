"""The long table of an experiment's results and the summaries drawn from it.

A result is one row ``{scenario, method, seed, site, marker, metric, value}`` (``LONG_COLUMNS``;
``marker`` is "" for whole-model metrics: dice, iou, macro_auc_*, volume_mae_ml ...). A method's
headline figure is the mean over evaluation sites (every site counts once), then mean and sample
standard deviation over seeds. Pure functions of the rows; the console table is text.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from common.config import MARKERS

HEADLINE_METRICS: tuple[str, ...] = ("dice", "macro_auc_slice", "macro_auc_study")
#: The columns of the long table (``metrics.csv``, ``metrics.json``'s rows).
LONG_COLUMNS: tuple[str, ...] = ("scenario", "method", "seed", "site", "marker", "metric", "value")


def slug(name: str) -> str:
    """A scenario name as a file-name part."""
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the finite values."""
    v = _finite(values)
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def select(rows: Sequence[dict], **key: Any) -> list[dict]:
    """The rows whose every ``key`` column has the given value."""
    return [r for r in rows if all(r.get(k) == v for k, v in key.items())]


def site_means(rows: Sequence[dict], scenario: str, method: str, metric: str, marker: str = "") -> dict[int, float]:
    """Per seed: the mean over evaluation sites of one metric (NaN sites skipped)."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for r in select(rows, scenario=scenario, method=method, metric=metric, marker=marker):
        by_seed[r["seed"]].append(r["value"])
    return {seed: float(np.mean(_finite(v))) if _finite(v) else math.nan for seed, v in sorted(by_seed.items())}


def summarise(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per (scenario, method): each headline metric as mean/sd over seeds of site means."""
    out = []
    for scenario, method in dict.fromkeys((r["scenario"], r["method"]) for r in rows):
        row: dict[str, Any] = {
            "scenario": scenario,
            "method": method,
            "sites": len({r["site"] for r in select(rows, scenario=scenario, method=method)}),
        }
        for metric in HEADLINE_METRICS:
            m, sd, n = mean_sd(site_means(rows, scenario, method, metric).values())
            row[metric], row[f"{metric}_sd"], row["seeds"] = m, sd, max(n, row.get("seeds", 0))
        out.append(row)
    return out


def site_marker_table(
    rows: Sequence[dict], scenario: str, method: str, metric: str = "auc_slice"
) -> tuple[list[str], np.ndarray]:
    """Sites x markers: the metric's mean over seeds."""
    sel = select(rows, scenario=scenario, method=method, metric=metric)
    sites = sorted({r["site"] for r in sel})
    table = np.full((len(sites), len(MARKERS)), np.nan)
    for i, site in enumerate(sites):
        for j, marker in enumerate(MARKERS):
            v = _finite(r["value"] for r in sel if r["site"] == site and r["marker"] == marker)
            table[i, j] = np.mean(v) if v else np.nan
    return sites, table


def paper_comparison(rows: Sequence[dict], paper: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's figures beside ours: each entry names our (scenario, method, metric, marker, site)."""
    out = []
    for entry in paper.get("rows", []):
        scenario = entry.get("scenario") or (rows[0]["scenario"] if rows else "")
        sel = select(
            rows, scenario=scenario, method=entry["method"], metric=entry["metric"], marker=entry.get("marker", "")
        )
        if entry.get("site"):
            sel = [r for r in sel if r["site"] == entry["site"]]
        per_seed: dict[int, list[float]] = defaultdict(list)
        for r in sel:
            per_seed[r["seed"]].append(r["value"])
        m, sd, n = mean_sd(np.mean(_finite(v)) if _finite(v) else math.nan for v in per_seed.values())
        out.append(
            {
                "label": entry["label"],
                "metric": entry["metric"],
                "marker": entry.get("marker", ""),
                "paper": entry["paper"],
                "ours": m,
                "ours_sd": sd,
                "seeds": n,
                "method": entry["method"],
            }
        )
    return out


def fmt(m: float, sd: float | None = None) -> str:
    """A figure with 3 decimals, "± sd" when there is a spread, "–" when missing (None or NaN)."""
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    return f"{m:.3f}" if sd is None or math.isnan(sd) or sd == 0 else f"{m:.3f} ± {sd:.3f}"


def auc_and_dice(rows: Sequence[dict], scenario: str, method: str, site: str, sep: str) -> str:
    """One site's slice macro-AUC and Dice under one method, each the mean over seeds."""
    values = [
        mean_sd(r["value"] for r in select(rows, scenario=scenario, method=method, site=site, metric=metric))[0]
        for metric in ("macro_auc_slice", "dice")
    ]
    return sep.join(fmt(v) for v in values)


def text_summary(summary: Sequence[dict], rows: Sequence[dict]) -> str:
    """The console table: per scenario, each method's headline figures; then per site for the first."""
    lines = []
    for scenario in dict.fromkeys(r["scenario"] for r in summary):
        lines.append(f"{scenario}:  (mean over sites; ± sd over seeds; study AUROC: the study-level table)")
        lines.append(f"  {'method':34s} {'Dice':>15s} {'macro-AUC slice':>17s}")
        for r in (r for r in summary if r["scenario"] == scenario):
            lines.append(
                f"  {r['method'][:34]:34s} {fmt(r['dice'], r['dice_sd']):>15s} "
                f"{fmt(r['macro_auc_slice'], r['macro_auc_slice_sd']):>17s}"
            )
    first = summary[0]["scenario"] if summary else ""
    methods = [r["method"] for r in summary if r["scenario"] == first]
    sites = sorted({r["site"] for r in select(rows, scenario=first, metric="macro_auc_slice")})
    if sites and len(methods) <= 6:
        lines.append(f"\nper site ({first}): macro-AUC slice / Dice")
        lines.append(f"  {'site':14s}" + "".join(f"{m[:17]:>18s}" for m in methods))
        for site in sites:
            cells = []
            for m in methods:
                cells.append(auc_and_dice(rows, first, m, site, "/"))
            lines.append(f"  {site[:14]:14s}" + "".join(f"{c:>18s}" for c in cells))
    return "\n".join(lines)
