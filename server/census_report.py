"""The census report: ``census.json`` (every site's and the pooled counts) and ``census.html`` (one
table and one figure per statistic, each site beside the pool, so the covariate shift between sites
shows before any training). Fractions are of the site's own studies (or brain pixels for HU), so
sites of different sizes compare; suppressed bins count as 0 in the sums, show as ``[c]`` in a site's
row and as ``>=n`` in the pool's (a lower bound: some site's part of it is suppressed), and are listed."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.census import (
    BINNED,
    HU,
    LABEL_MISSING,
    LABEL_NEG,
    LABEL_POS,
    SCANNER,
    SLICES,
    STUDIES,
    SUPPRESSED,
    THICKNESS,
    VOLUME,
)
from common.config import LABELS

TITLES = {
    SCANNER: "Scanner (studies)",
    THICKNESS: "Slice thickness, mm (studies)",
    HU: "HU inside the brain (pixels of the cached slices)",
    VOLUME: "Hematoma volume, ml (studies with a mask)",
}


def rows(census: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, census) for every site, then the pool."""
    return [*census["sites"].items(), ("pooled", census["pooled"])]


def matrix(census: Mapping[str, Any], key: str) -> tuple[list[str], np.ndarray]:
    """(bin labels, counts [rows, bins]) of one statistic; the scanner's bins are every name seen."""
    if key == SCANNER:
        names = sorted(census["pooled"][SCANNER])
        return names, np.array([[c[SCANNER].get(n, 0) for n in names] for _, c in rows(census)], dtype=float)
    return BINNED[key], np.array([c[key] for _, c in rows(census)], dtype=float)


#: How a suppressed bin shows in a site's row (a bin under the site's census-min-count, or suppressed
#: with one so that the totals do not give it back; which of the two is not sent).
SUPPRESSED_MARK = "[c]"


def cell_texts(census: Mapping[str, Any], key: str, labels: list[str], counts: np.ndarray) -> list[list[str]]:
    """The numbers to print, row by row: the count, ``[c]`` where the site suppressed it, and ``>=n``
    in the pool where any site's part of it is suppressed."""
    sites = list(census["sites"].values())
    hidden = [{str(b) for b in c.get(SUPPRESSED, [])} for c in sites]
    out = []
    for r, row in enumerate(counts):
        if r < len(sites):
            out.append([SUPPRESSED_MARK if f"{key}/{b}" in hidden[r] else f"{int(v)}" for b, v in zip(labels, row)])
        else:
            out.append(
                [f"≥{int(v)}" if any(f"{key}/{b}" in h for h in hidden) else f"{int(v)}" for b, v in zip(labels, row)]
            )
    return out


def fractions(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def prevalence(census: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per row and label: positives / annotated studies, and missing / all studies."""
    pos = np.array([c[LABEL_POS] for _, c in rows(census)], dtype=float)
    neg = np.array([c[LABEL_NEG] for _, c in rows(census)], dtype=float)
    miss = np.array([c[LABEL_MISSING] for _, c in rows(census)], dtype=float)
    known = pos + neg
    return (
        np.divide(pos, known, out=np.full_like(pos, np.nan), where=known > 0),
        np.divide(miss, known + miss, out=np.full_like(miss, np.nan), where=known + miss > 0),
    )


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def heatmap(names: list[str], labels: list[str], values: np.ndarray, texts: list[list[str]], title: str) -> str:
    """Rows (sites, pool last) x bins, coloured by fraction, annotated with ``texts`` (``cell_texts``);
    a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 0.8 + 0.32 * len(names)))
    ax.imshow(np.nan_to_num(values), aspect="auto", cmap="viridis", vmin=0, vmax=max(float(np.nanmax(values)), 1e-9))
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.axhline(len(names) - 1.5, color="white", lw=2)  # the pool below the sites
    for i, row in enumerate(texts):
        for j, text in enumerate(row):
            ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def table(names: list[str], labels: list[str], texts: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(x)}</th>" for x in ["", *labels])
    body = "".join(
        f"<tr><th>{html.escape(n)}</th>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
        for n, row in zip(names, texts)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(census: Mapping[str, Any]) -> str:
    names = [n for n, _ in rows(census)]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>hemexp data census</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style>",
        "<h1>Data census</h1>",
        f"<p>{len(census['sites'])} site(s), {census['pooled'][STUDIES][0]} studies, "
        f"{census['pooled'][SLICES][0]} slices. Colour: fraction of the row's total; numbers: counts. "
        f"{SUPPRESSED_MARK}: a bin the site suppressed (under its census-min-count, or suppressed with one so "
        "that its totals do not give it back), counted as 0; ≥n in the pool: some site's part is suppressed "
        "(listed at the end).</p>",
    ]
    for key in (SCANNER, THICKNESS, HU, VOLUME):
        labels, counts = matrix(census, key)
        texts = cell_texts(census, key, labels, counts)
        parts += [
            f"<h2>{TITLES[key]}</h2>",
            f"<img src='data:image/png;base64,{heatmap(names, labels, fractions(counts), texts, TITLES[key])}'>",
            table(names, labels, texts),
        ]
    prev, missing = prevalence(census)
    positives = cell_texts(census, LABEL_POS, list(LABELS), np.array([c[LABEL_POS] for _, c in rows(census)]))
    absent = cell_texts(census, LABEL_MISSING, list(LABELS), np.array([c[LABEL_MISSING] for _, c in rows(census)]))
    parts += [
        "<h2>Label prevalence (positives / annotated studies)</h2>",
        f"<img src='data:image/png;base64,{heatmap(names, list(LABELS), prev, positives, 'prevalence; numbers: positives')}'>",
        "<h2>Missing labels (not annotated / studies)</h2>",
        f"<img src='data:image/png;base64,{heatmap(names, list(LABELS), missing, absent, 'missing rate; numbers: studies')}'>",
        "<h2>Suppressed bins</h2>",
        "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in census["pooled"][SUPPRESSED]) + "</ul>"
        if census["pooled"][SUPPRESSED]
        else "<p>none</p>",
    ]
    return "\n".join(parts)


def write_census_files(out_dir: Path, census: Mapping[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "census.json").write_text(json.dumps(census, indent=1))
    page = out_dir / "census.html"
    page.write_text(render_html(census))
    return page
