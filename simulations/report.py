"""The experiment report: ``metrics.json`` (long table), CSVs, PNG figures and ``report.html``.

``metrics.json``: ``{"experiment", "rows": [{scenario, method, seed, site, marker, metric, value}],
"summary", "curves", "sites", "timings", "failures", "privacy", "environment"}``. ``marker`` is ""
for whole-model metrics (dice, iou, macro_auc_*, volume_mae_ml ...). A method's headline figure is
the mean over evaluation sites (every site counts once), then mean and sample standard deviation
over seeds. Figures are written as PNG files and embedded in the HTML, so the page stands alone.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import platform
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from common.config import MARKERS

HEADLINE_METRICS: tuple[str, ...] = ("dice", "macro_auc_slice", "macro_auc_study")


# --- numbers ------------------------------------------------------------------------------------


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


# --- pictures -----------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def plot_site_marker_heatmaps(rows: Sequence[dict], scenario: str, methods: Sequence[str], path: Path) -> Path | None:
    tables = [(m, *site_marker_table(rows, scenario, m)) for m in methods]
    tables = [t for t in tables if t[1]]
    if not tables:
        return None
    plt = _plt()
    n_sites = max(len(t[1]) for t in tables)
    fig, axes = plt.subplots(1, len(tables), figsize=(2.9 * len(tables) + 1.5, 0.32 * n_sites + 2.0), squeeze=False)
    for k, (ax, (method, sites, table)) in enumerate(zip(axes[0], tables)):
        im = ax.imshow(table, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(MARKERS)), [m.replace("_", "\n") for m in MARKERS], fontsize=7, rotation=45)
        ax.set_yticks(range(len(sites)), sites if k == 0 else [""] * len(sites), fontsize=7)
        ax.set_title(method, fontsize=9)
        for (i, j), v in np.ndenumerate(table):
            ax.text(
                j,
                i,
                "–" if np.isnan(v) else f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if not np.isnan(v) and v < 0.6 else "black",
            )
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="slice AUC")
    fig.suptitle(f"{scenario}: slice-level AUC per site and marker (mean over seeds)", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_dice_per_site(rows: Sequence[dict], scenario: str, methods: Sequence[str], path: Path) -> Path | None:
    sel = select(rows, scenario=scenario, metric="dice", marker="")
    sites = sorted({r["site"] for r in sel if r["method"] in methods})
    if not sites:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(sites) * max(1, len(methods) / 3)), 3.4))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        vals = [mean_sd(r["value"] for r in sel if r["method"] == method and r["site"] == s) for s in sites]
        ax.bar(np.arange(len(sites)) + k * width, [v[0] for v in vals], width, yerr=[v[1] for v in vals], label=method)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, sites, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("Dice (test patients)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=min(4, len(methods)))
    ax.set_title(f"{scenario}: hematoma Dice per site", fontsize=10)
    return _save(fig, path)


def plot_round_curves(curves: Sequence[dict], scenario: str, path: Path) -> Path | None:
    sel = [c for c in curves if c["scenario"] == scenario]
    if not sel:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for method in dict.fromkeys(c["method"] for c in sel):
        pts = [c for c in sel if c["method"] == method]
        rounds = sorted({c["round"] for c in pts})
        for ax, key in zip(axes, HEADLINE_METRICS):
            y = [
                np.nanmean([c[key] for c in pts if c["round"] == r])
                if any(not math.isnan(c[key]) for c in pts if c["round"] == r)
                else np.nan
                for r in rounds
            ]
            ax.plot(rounds, y, "o-", ms=3, label=method)
    stage2 = [c["round"] for c in sel if c["stage"] == 2]
    for ax, title in zip(axes, ("Dice", "macro-AUC (slices)", "macro-AUC (studies)")):
        if stage2:
            ax.axvline(min(stage2) - 0.5, color="grey", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round (stage 1 | stage 2)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{scenario}: test metrics after every round (mean over sites and seeds)", fontsize=10)
    return _save(fig, path)


def plot_roc(roc: dict[str, dict[str, Any]], scenario: str, path: Path) -> Path | None:
    from sklearn.metrics import roc_curve

    sel = {
        k.split("/", 1)[1] if k.startswith(f"{scenario}/") else k: v
        for k, v in roc.items()
        if k.startswith(f"{scenario}/")
    }
    if not sel:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(MARKERS), figsize=(3.3 * len(MARKERS), 3.3))
    for method, arrays in sel.items():
        if not arrays["labels"]:
            continue
        for j, marker in enumerate(MARKERS):
            if marker not in arrays["names"]:
                continue
            col = arrays["names"].index(marker)
            y, s = np.concatenate(arrays["labels"])[:, col], np.concatenate(arrays["scores"])[:, col]
            ok = ~np.isnan(y)
            if len(np.unique(y[ok])) < 2:
                continue
            fpr, tpr, _ = roc_curve(y[ok], s[ok])
            axes[j].plot(fpr, tpr, lw=1.2, label=method)
    for ax, marker in zip(axes, MARKERS):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set_title(marker, fontsize=10)
        ax.set_xlabel("false positive rate")
    axes[0].set_ylabel("true positive rate")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{scenario}: slice-level ROC, test slices of every site pooled (first seed)", fontsize=10)
    return _save(fig, path)


def plot_site_shift(sites: Sequence[dict], caches: dict[str, Any], path: Path, max_slices: int = 400) -> Path | None:
    """Per site: the grey-level histogram of head pixels, and one example slice (with hematoma)."""
    if not caches:
        return None
    plt = _plt()
    names = [s["site"] for s in sites if s["site"] in caches]
    fig = plt.figure(figsize=(13, 3.2 + 1.3 * math.ceil(len(names) / 8)))
    grid = fig.add_gridspec(1 + math.ceil(len(names) / 8), 8, height_ratios=[2.2] + [1.0] * math.ceil(len(names) / 8))
    hist_ax = fig.add_subplot(grid[0, :])
    cmap = plt.get_cmap("tab20")
    for k, name in enumerate(names):
        cache = caches[name]
        idx = np.linspace(0, cache.n_slices - 1, min(max_slices, cache.n_slices)).astype(int)
        pix = np.asarray(cache.images[idx]).ravel()
        pix = pix[pix > 0]
        hist_ax.hist(pix, bins=64, range=(0, 255), histtype="step", density=True, color=cmap(k % 20), label=name)
        ax = fig.add_subplot(grid[1 + k // 8, k % 8])
        pixels = np.concatenate([np.asarray(s["mask_pixels"]) for s in cache.studies]) if cache.studies else np.zeros(1)
        ax.imshow(np.asarray(cache.images[int(np.argmax(pixels))]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    hist_ax.set_xlabel("grey level inside the head (window mapped onto 0..255)")
    hist_ax.set_ylabel("density")
    hist_ax.legend(fontsize=6, ncol=6)
    hist_ax.set_title("site shift: intensity histograms and one example slice per site", fontsize=10)
    return _save(fig, path)


def plot_overlays(model, examples: Sequence[tuple[str, Any]], path: Path) -> Path | None:
    """Reference (green) and predicted (red) hematoma outlines on test slices of several sites."""
    import torch

    from common.model import to_input

    if model is None or not examples:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(examples), figsize=(2.3 * len(examples), 2.6), squeeze=False)
    model.eval()
    for ax, (site, item) in zip(axes[0], examples):
        with torch.inference_mode():
            logits, _ = model(to_input(item["image"][None], "cpu"))
        pred = (logits[0, 0] > 0).numpy()
        ax.imshow(item["image"].numpy(), cmap="gray", vmin=0, vmax=255)
        if item["mask"].numpy().any():
            ax.contour(item["mask"].numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        if pred.any():
            ax.contour(pred, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(site, fontsize=7)
        ax.axis("off")
    fig.suptitle("test slices: reference mask (green) vs prediction (red)", fontsize=9)
    return _save(fig, path)


def plot_scenario_trend(summary: Sequence[dict], path: Path) -> Path | None:
    """A headline metric per method across the scenarios (growing shift, more faulty sites ...)."""
    scenarios = list(dict.fromkeys(r["scenario"] for r in summary))
    if len(scenarios) < 2:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for method in dict.fromkeys(r["method"] for r in summary):
        for ax, key in zip(axes, ("macro_auc_slice", "dice")):
            y = [
                next((r[key] for r in summary if r["scenario"] == s and r["method"] == method), np.nan)
                for s in scenarios
            ]
            e = [
                next((r[f"{key}_sd"] for r in summary if r["scenario"] == s and r["method"] == method), np.nan)
                for s in scenarios
            ]
            ax.errorbar(range(len(scenarios)), y, yerr=e, marker="o", ms=4, capsize=2, label=method)
    for ax, title in zip(axes, ("macro-AUC (slices)", "Dice")):
        ax.set_xticks(range(len(scenarios)), scenarios, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_privacy(privacy: Sequence[dict], path: Path) -> Path | None:
    if not privacy:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for (method, site), pts in _group(privacy, ("method", "site")).items():
        pts = sorted(pts, key=lambda p: p["round"])
        ax.plot([p["round"] for p in pts], [p["epsilon"] for p in pts], lw=1, label=f"{method} {site}")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.set_title("privacy budget spent per site", fontsize=10)
    ax.legend(fontsize=5, ncol=2)
    return _save(fig, path)


def _group(rows: Sequence[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


# --- files ----------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Versions and the commit, so that a run can be repeated."""
    versions = {}
    for dist in (
        "torch",
        "flwr",
        "segmentation-models-pytorch",
        "timm",
        "pytorch-wavelets",
        "PyWavelets",
        "pydicom",
        "opacus",
        "numpy",
        "scipy",
        "scikit-learn",
        "nibabel",
        "hemexp",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "command": " ".join(sys.argv),
    }


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _json_safe(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return _json_safe(o.item())
    return o


def _fmt(m: float, sd: float | None = None) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    return f"{m:.3f}" if sd is None or math.isnan(sd) or sd == 0 else f"{m:.3f} ± {sd:.3f}"


def _table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)} '
        f"(<code>{html.escape(path.name)}</code>)</figcaption></figure>"
    )


def text_summary(summary: Sequence[dict], rows: Sequence[dict]) -> str:
    """The console table: per scenario, each method's headline figures; then per site for the first."""
    lines = []
    for scenario in dict.fromkeys(r["scenario"] for r in summary):
        lines.append(f"{scenario}:  (mean over sites; ± sd over seeds)")
        lines.append(f"  {'method':34s} {'Dice':>15s} {'macro-AUC slice':>17s} {'macro-AUC study':>17s}")
        for r in (r for r in summary if r["scenario"] == scenario):
            lines.append(
                f"  {r['method'][:34]:34s} {_fmt(r['dice'], r['dice_sd']):>15s} "
                f"{_fmt(r['macro_auc_slice'], r['macro_auc_slice_sd']):>17s} "
                f"{_fmt(r['macro_auc_study'], r['macro_auc_study_sd']):>17s}"
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
                cells.append(_auc_and_dice(rows, first, m, site, "/"))
            lines.append(f"  {site[:14]:14s}" + "".join(f"{c:>18s}" for c in cells))
    return "\n".join(lines)


STYLE = (
    "body{font-family:sans-serif;max-width:1250px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.6em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
    "text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:12px;color:#555}"
    ".note{background:#fff6d5;padding:0.6em 1em;border-left:4px solid #e0b000}pre{background:#f6f6f6;padding:0.6em;"
    "overflow-x:auto;font-size:12px}"
)


def write_report(
    out_dir: Path,
    exp,
    results,
    figures_extra: dict[str, Any],
    env: dict[str, Any],
    synthetic: bool,
    experiment_text: str,
) -> Path:
    """Write metrics.json, the CSVs, the PNGs and report.html into ``out_dir``; returns the HTML path."""
    rows, curves = results.rows, results.curves
    summary = summarise(rows)
    paper = paper_comparison(rows, dict(exp.paper)) if exp.paper else []
    (out_dir / "experiment.toml").write_text(experiment_text)
    doc = {
        "experiment": {
            "name": exp.name,
            "description": exp.description,
            "seeds": list(exp.seeds),
            "budget": exp.budget.__dict__,
            "source": exp.source,
            "methods": [
                {"name": m.name, "kind": m.kind, "run_config": exp.method_run_config(m), "split_by": m.split_by}
                for m in exp.methods
            ],
            "scenarios": [dict(s.__dict__) for s in exp.scenarios],
        },
        "rows": rows,
        "summary": summary,
        "paper": paper,
        "curves": curves,
        "sites": results.sites,
        "timings": results.timings,
        "failures": results.failures,
        "privacy": results.privacy,
        "environment": env,
    }
    (out_dir / "metrics.json").write_text(json.dumps(_json_safe(doc), indent=1))
    write_csv(out_dir / "metrics.csv", rows, ("scenario", "method", "seed", "site", "marker", "metric", "value"))
    write_csv(
        out_dir / "summary.csv",
        summary,
        ["scenario", "method", "sites", "seeds"] + [k for m in HEADLINE_METRICS for k in (m, f"{m}_sd")],
    )
    write_csv(out_dir / "curves.csv", curves, ("scenario", "method", "seed", "round", "stage") + HEADLINE_METRICS)

    figs = out_dir / "figures"
    figs.mkdir(exist_ok=True)
    parts = [f"<h1>hemexp simulation: {html.escape(exp.name)}</h1>", f"<p>{html.escape(exp.description)}</p>"]
    if synthetic:
        parts.append(
            '<p class="note">These results are on <b>synthetic</b> CT data generated by hemexp '
            "(simulations/synthetic), not on patients. They show that the pipeline learns and how methods "
            "compare under the simulated site differences; they are not clinical performance figures.</p>"
        )
    parts.append(
        "<h2>Headline</h2><p>Mean over evaluation sites (each site counts once), ± standard deviation "
        f"over {len(exp.seeds)} seed(s). Budget: {exp.budget.rounds_stage1} + {exp.budget.rounds_stage2} rounds x "
        f"{exp.budget.local_steps} steps x batch {exp.budget.batch_size} per site; the pooled model gets the "
        "sites' steps together, every local model its own site's.</p>"
    )
    parts.append(
        _table(
            ["scenario", "method", "sites", "Dice", "macro-AUC (slices)", "macro-AUC (studies)"],
            [
                [
                    r["scenario"],
                    r["method"],
                    r["sites"],
                    _fmt(r["dice"], r["dice_sd"]),
                    _fmt(r["macro_auc_slice"], r["macro_auc_slice_sd"]),
                    _fmt(r["macro_auc_study"], r["macro_auc_study_sd"]),
                ]
                for r in summary
            ],
        )
    )
    if paper:
        parts.append(
            "<h2>Beside the source paper</h2><p>The paper's figures are on its clinical data (12 hospitals); "
            "ours are on synthetic data, so only the direction of each comparison can be compared, not the "
            f"values. {html.escape(str(exp.paper.get('note', '')))}</p>"
        )
        parts.append(
            _table(
                ["condition", "metric", "marker", "paper", "ours", "our method"],
                [
                    [p["label"], p["metric"], p["marker"], p["paper"], _fmt(p["ours"], p["ours_sd"]), p["method"]]
                    for p in paper
                ],
            )
        )
    trend = plot_scenario_trend(summary, figs / "scenarios.png")
    if trend:
        parts.append("<h2>Across scenarios</h2>" + _img(trend, "headline metrics per scenario"))
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        methods = list(dict.fromkeys(r["method"] for r in rows if r["scenario"] == scenario))
        part = slug(scenario)
        parts.append(f"<h2>Scenario {html.escape(scenario)}</h2>")
        site_desc = results.sites.get(scenario, [])
        if site_desc:
            parts.append(
                _table(
                    ["site", "studies", "patients", "train slices"] + list(MARKERS) + ["scanner shift", "fault"],
                    [
                        [s["site"], s["studies"], s["patients"], s["train_slices"]]
                        + [s["positives"][m] for m in MARKERS]
                        + [s["shift"] or "–", s["fault"] or "–"]
                        for s in site_desc
                    ],
                )
            )
        parts.append(
            _img(
                plot_site_marker_heatmaps(rows, scenario, methods, figs / f"{part}_auc_sites.png"),
                "slice AUC per site and marker, every method",
            )
        )
        parts.append(_per_site_table(rows, scenario, methods))
        parts.append(
            _img(plot_dice_per_site(rows, scenario, methods, figs / f"{part}_dice_sites.png"), "Dice per site")
        )
        parts.append(_img(plot_round_curves(curves, scenario, figs / f"{part}_curves.png"), "curves per round"))
        parts.append(_img(plot_roc(results.roc, scenario, figs / f"{part}_roc.png"), "ROC curves"))
        extra = figures_extra.get(scenario, {})
        parts.append(_img(extra.get("shift"), "site shift"))
        parts.append(_img(extra.get("overlays"), "example overlays"))
    if results.privacy:
        last = {}
        for r in sorted(results.privacy, key=lambda r: r["round"]):
            last[(r["scenario"], r["method"], r["seed"], r["site"])] = r["epsilon"]
        parts.append(
            "<h2>Privacy budget (DP-SGD)</h2><p>Epsilon each site had spent after the last round it "
            "trained (per slice: a patient contributes several slices, see docs/privacy.md).</p>"
        )
        parts.append(
            _table(["scenario", "method", "seed", "site", "epsilon"], [[*k, _fmt(v)] for k, v in sorted(last.items())])
        )
    parts.append(_img(plot_privacy(results.privacy, figs / "privacy.png"), "privacy budget per site"))
    if results.failures:
        parts.append(
            "<h2>Site failures and rejected updates</h2>"
            + _table(
                ["scenario", "method", "seed", "round", "phase", "site", "reason"],
                [
                    [
                        f["scenario"],
                        f["method"],
                        f["seed"],
                        f["round"],
                        f.get("phase", ""),
                        f.get("site", ""),
                        f.get("reason", ""),
                    ]
                    for f in results.failures[:200]
                ],
            )
        )
    parts.append(
        "<h2>Run time</h2>"
        + _table(
            ["scenario", "method", "seed", "seconds"],
            [[t["scenario"], t["method"], t["seed"], f"{t['seconds']:.0f}"] for t in results.timings],
        )
    )
    parts.append(
        "<h2>Configuration and versions</h2><p>Repeat with the same command on the same commit; "
        "<code>experiment.toml</code> beside this report is the experiment as run.</p>"
    )
    parts.append(f"<pre>{html.escape(json.dumps(_json_safe(env), indent=1))}</pre>")
    parts.append(f"<pre>{html.escape(experiment_text)}</pre>")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>hemexp {html.escape(exp.name)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def _auc_and_dice(rows: Sequence[dict], scenario: str, method: str, site: str, sep: str) -> str:
    """One site's slice macro-AUC and Dice under one method, each the mean over seeds."""
    values = [
        mean_sd(r["value"] for r in select(rows, scenario=scenario, method=method, site=site, metric=metric))[0]
        for metric in ("macro_auc_slice", "dice")
    ]
    return sep.join(_fmt(v) for v in values)


def _per_site_table(rows: Sequence[dict], scenario: str, methods: Sequence[str]) -> str:
    """Sites x methods: slice macro-AUC and Dice (means over seeds)."""
    sites = sorted({r["site"] for r in select(rows, scenario=scenario)})
    body = []
    for site in sites:
        cells = [site]
        for m in methods:
            cells.append(_auc_and_dice(rows, scenario, m, site, " / "))
        body.append(cells)
    return "<p>Per site: macro-AUC (slices) / Dice.</p>" + _table(["site"] + list(methods), body)
