"""The report's pictures (matplotlib, Agg, PNG files): one function per figure, None when there is
nothing to draw, so that the HTML leaves the figure out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.config import MARKERS
from simulations.report.tables import HEADLINE_METRICS, mean_sd, select, site_marker_table


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
    """Sites x markers heatmap of slice AUC (mean over seeds), one panel per method."""
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
    """Bars of each site's Dice per method, mean and sd over seeds."""
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
    """The headline metrics after every round per method (mean over sites and seeds), stage 2 marked;
    nothing when fewer than two rounds were scored (``eval.test-rounds = "last"``): a curve of one point
    per method says nothing a table does not."""
    sel = [c for c in curves if c["scenario"] == scenario]
    if len({c["round"] for c in sel}) < 2:
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
    """Slice-level ROC per marker and method, every site's test slices pooled."""
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
            ok = ~np.isnan(y) & ~np.isnan(s)  # unscored slices (not used by the study rule) are NaN
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
    fig.suptitle(f"{scenario}: slice-level ROC, scored test slices of every site pooled (first seed)", fontsize=10)
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
            logits = model.segment(to_input(item["image"][None], "cpu"))
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
    """Epsilon spent per round by each (method, site)."""
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


def plot_curves(history: list[dict], path: Path | str) -> Path:
    """Train loss and validation Dice / macro-AUC per epoch, stage 1 then stage 2 (one figure)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = np.arange(1, len(history) + 1)
    stage = np.asarray([h["stage"] for h in history])
    for ax, key, title in zip(
        axes,
        ("train_loss", "val/dice", "val/macro_auc_study"),
        ("training loss", "validation Dice", "validation macro-AUC (study)"),
    ):
        y = np.asarray([h.get(key, np.nan) for h in history], dtype=float)
        for s, colour in ((1, "tab:blue"), (2, "tab:orange")):
            sel = stage == s
            if sel.any():
                ax.plot(x[sel], y[sel], "o-", color=colour, label=f"stage {s}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_study_curves(studies: Sequence[dict], scenario: str, path: Path) -> Path | None:
    """Study-level ROC (top) and precision-recall (bottom) per marker and method: every site's test
    studies, seeds pooled, calibrated probabilities (``simulations.report.studies``)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    from simulations.report.studies import entries_of, methods_of, pooled

    methods = [m for m in methods_of(studies, scenario) if entries_of(studies, scenario, m)]
    if not methods:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(MARKERS), figsize=(3.3 * len(MARKERS), 6.4), squeeze=False)
    for method in methods:
        o = pooled(entries_of(studies, scenario, method), "calibrated")
        p = o.probabilities()
        for j, marker in enumerate(MARKERS):
            if marker not in o.names:
                continue
            c = o.names.index(marker)
            y, s = o.labels[:, c], p[:, c]
            ok = ~np.isnan(y) & ~np.isnan(s)  # unscored slices (not used by the study rule) are NaN
            if len(np.unique(y[ok])) < 2:
                continue
            fpr, tpr, _ = roc_curve(y[ok], s[ok])
            prec, rec, _ = precision_recall_curve(y[ok], s[ok])
            axes[0, j].plot(fpr, tpr, lw=1.2, label=method)
            axes[1, j].plot(rec, prec, lw=1.2, label=method)
    for j, marker in enumerate(MARKERS):
        axes[0, j].plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        axes[0, j].set_title(marker, fontsize=10)
        axes[0, j].set_xlabel("false positive rate")
        axes[1, j].set_xlabel("recall")
    axes[0, 0].set_ylabel("true positive rate")
    axes[1, 0].set_ylabel("precision")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"{scenario}: study-level ROC and PR, test studies of every site, seeds pooled", fontsize=10)
    return _save(fig, path)


def plot_reliability(studies: Sequence[dict], scenario: str, path: Path) -> Path | None:
    """Reliability diagram per method: observed vs predicted marker frequency before and after the
    validation temperature, with the ECE of each (markers pooled)."""
    from simulations.report.studies import entries_of, methods_of, reliability

    methods = [m for m in methods_of(studies, scenario) if entries_of(studies, scenario, m)]
    if not methods:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        rel = reliability(entries_of(studies, scenario, method))
        for mode, style in (("raw", "o:"), ("calibrated", "s-")):
            pts = rel[mode]["points"]
            if pts:
                ax.plot(
                    [q[0] for q in pts], [q[1] for q in pts], style, ms=3, label=f"{mode} (ECE {rel[mode]['ece']:.3f})"
                )
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_title(method[:32], fontsize=8)
        ax.set_xlabel("predicted probability")
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("observed frequency")
    fig.suptitle(f"{scenario}: reliability of study probabilities (markers pooled)", fontsize=10)
    return _save(fig, path)
