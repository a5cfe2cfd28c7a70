"""The report page, ``report.html``: tables, and every figure embedded as PNG data, so that the page
stands alone; ``write_report`` writes it with the data files beside it.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from common.config import MARKERS
from simulations.report.cost_section import write_costs
from simulations.report.expansion_section import write_expansion
from simulations.report.figures import (
    plot_dice_per_site,
    plot_privacy,
    plot_reliability,
    plot_roc,
    plot_round_curves,
    plot_scenario_trend,
    plot_site_marker_heatmaps,
    plot_study_curves,
)
from simulations.report.files import json_safe, write_data
from simulations.report.gan_section import write_gan
from simulations.report.sections import Figure, Paragraph, Section, Table
from simulations.report.studies import HEADLINE_COLUMNS, cell, study_tables, to_json
from simulations.report.tables import auc_and_dice, fmt, paper_comparison, select, slug, summarise


def html_table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
    """An HTML table, every cell escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def img(path: Path | None, alt: str) -> str:
    """A PNG file as an embedded figure with its caption; "" without a file."""
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)} '
        f"(<code>{html.escape(path.name)}</code>)</figcaption></figure>"
    )


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
    tables: dict[str, dict[str, list]] | None = None,
    sections: Sequence[Section] = (),
    n_boot: int | None = None,
) -> Path:
    """Write metrics.json, the CSVs, the PNGs and report.html into ``out_dir``; returns the HTML path.
    ``tables``: the study-level tables (``simulations.report.studies.study_tables``), computed here if None;
    ``sections``: more optional sections made by the caller, placed after the scenarios' (e.g.
    ``ceiling_section.write_ceiling``, which needs the data root);
    ``n_boot``: bootstrap replicates of the sections' intervals (default ``N_BOOT_REPORT``)."""
    n_boot = N_BOOT_REPORT if n_boot is None else n_boot
    tables = study_tables(results.studies, n_boot) if tables is None else tables
    (out_dir / "studies.json").write_text(json.dumps(json_safe(to_json(results.studies))))
    (out_dir / "study_metrics.json").write_text(json.dumps(json_safe(tables), indent=1))
    summary = summarise(results.rows)
    paper = paper_comparison(results.rows, dict(exp.paper)) if exp.paper else []
    write_data(out_dir, exp, results, summary, paper, env, experiment_text)
    figs = out_dir / "figures"
    figs.mkdir(exist_ok=True)
    parts = headline_parts(exp, summary, paper, synthetic)
    trend = plot_scenario_trend(summary, figs / "scenarios.png")
    if trend:
        parts.append("<h2>Across scenarios</h2>" + img(trend, "headline metrics per scenario"))
    for scenario in dict.fromkeys(r["scenario"] for r in results.rows):
        parts += study_parts(scenario, tables.get(scenario), results.studies, figs)
        parts += scenario_parts(scenario, results, figures_extra.get(scenario, {}), figs)
    for section in sections:
        parts += section_parts(section)
    parts += section_parts(write_gan(out_dir, results.gan, results.gan_grids))
    parts += section_parts(write_expansion(out_dir, results.studies, results.expansion, n_boot))
    parts += section_parts(write_costs(out_dir, results.costs))
    parts += privacy_parts(results.privacy, figs)
    parts += run_parts(results.failures, results.timings)
    parts += configuration_parts(env, experiment_text)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>hemexp {html.escape(exp.name)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def headline_parts(exp, summary: Sequence[dict], paper: Sequence[dict], synthetic: bool) -> list[str]:
    """Title, the synthetic-data note, the headline table and the paper's figures beside ours."""
    parts = [f"<h1>hemexp simulation: {html.escape(exp.name)}</h1>", f"<p>{html.escape(exp.description)}</p>"]
    if synthetic:
        parts.append(
            '<p class="note">These results are on <b>synthetic</b> CT data generated by hemexp '
            "(simulations/synthetic), not on patients. They show that the pipeline learns and how methods "
            "compare under the simulated site differences; they are not clinical performance figures.</p>"
        )
    parts.append(
        "<h2>Segmentation and slices, per site</h2><p>The markers' headline is the study-level table of each "
        "scenario below (test studies of every site pooled, 95 % patient-bootstrap intervals): the one "
        "definition of a method's study AUROC. Here: hematoma Dice and the slice-level macro AUROC, mean over "
        f"evaluation sites (each site counts once), ± standard deviation over {len(exp.seeds)} seed(s). Budget: "
        f"{exp.budget.rounds_stage1} + {exp.budget.rounds_stage2} rounds x {exp.budget.local_steps} steps x batch "
        f"{exp.budget.batch_size} per site; the pooled model gets the sites' steps together, every local model "
        "its own site's.</p>"
    )
    parts.append(
        html_table(
            ["scenario", "method", "sites", "Dice", "macro-AUC (slices)"],
            [
                [
                    r["scenario"],
                    r["method"],
                    r["sites"],
                    fmt(r["dice"], r["dice_sd"]),
                    fmt(r["macro_auc_slice"], r["macro_auc_slice_sd"]),
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
            html_table(
                ["condition", "metric", "marker", "paper", "ours", "our method"],
                [
                    [p["label"], p["metric"], p["marker"], p["paper"], fmt(p["ours"], p["ours_sd"]), p["method"]]
                    for p in paper
                ],
            )
        )
    return parts


#: Bootstrap replicates of the report's study-level intervals.
N_BOOT_REPORT = 2000


def study_parts(scenario: str, tables: dict[str, list] | None, studies, figs: Path) -> list[str]:
    """The study-level results of one scenario: headline with 95 % intervals, paired differences,
    study ROC / PR curves, the reliability diagram, and per site n, n_pos, AUROC and Dice."""
    if not tables or not tables["headline"]:
        return []
    part = slug(scenario)
    parts = [
        f"<h2>Study level: {html.escape(scenario)}</h2>",
        "<p>Every method's model chosen on validation (round, per-marker temperature and threshold); "
        "test studies of all sites pooled within each seed, metric per seed, mean over seeds; "
        "95 % patient-bootstrap intervals. Sensitivity and specificity at the validation thresholds; "
        "ECE raw = before the validation temperature.</p>",
    ]
    cols = (*HEADLINE_COLUMNS, "ece_raw")
    parts.append(
        html_table(
            ["method", "marker", "n", "n_pos", *cols],
            [
                [r["method"], r["marker"], r["n"], r.get("n_pos", "")] + [cell(r.get(c)) for c in cols]
                for r in tables["headline"]
            ],
        )
    )
    if tables["paired"]:
        parts.append("<h3>Paired differences (macro study AUROC, A - B, same test studies)</h3>")
        parts.append(
            html_table(
                ["A", "B", "difference [95 % CI]"], [[p["a"], p["b"], cell(p["difference"])] for p in tables["paired"]]
            )
        )
    if tables.get("planned"):
        parts.append("<h3>Planned comparisons (one marker's study AUROC, A - B, same test studies)</h3>")
        parts.append(
            html_table(
                ["A", "B", "marker", "n (pos)", "difference [95 % CI]"],
                [
                    [p["a"], p["b"], p["marker"], f"{p['n']} ({p['n_pos']})", cell(p["difference"])]
                    for p in tables["planned"]
                ],
            )
        )
    parts.append(img(plot_study_curves(studies, scenario, figs / f"{part}_study_curves.png"), "study-level ROC and PR"))
    parts.append(img(plot_reliability(studies, scenario, figs / f"{part}_reliability.png"), "reliability diagram"))
    site_rows = [r for r in tables["per_site"] if r["marker"] in ("macro", "dice")]
    if site_rows:
        parts.append("<h3>Per site (test studies)</h3>")
        parts.append(
            html_table(
                ["method", "site", "metric", "n", "n_pos per marker", "value [95 % CI]"],
                [
                    [
                        r["method"],
                        r["site"],
                        "macro AUROC" if r["marker"] == "macro" else "Dice (per study)",
                        r["n"],
                        " ".join(f"{m}:{c['n_pos']}" for m, c in r.get("markers", {}).items()),
                        cell(r.get("auroc") if r["marker"] == "macro" else r.get("dice")),
                    ]
                    for r in site_rows
                ],
            )
        )
    return parts


def scenario_parts(scenario: str, results, extra: dict[str, Any], figs: Path) -> list[str]:
    """One scenario's section: its sites, per-site tables and figures (written into ``figs``)."""
    rows, curves = results.rows, results.curves
    methods = list(dict.fromkeys(r["method"] for r in rows if r["scenario"] == scenario))
    part = slug(scenario)
    parts = [f"<h2>Scenario {html.escape(scenario)}</h2>"]
    site_desc = results.sites.get(scenario, [])
    if site_desc:
        parts.append(
            html_table(
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
        img(
            plot_site_marker_heatmaps(rows, scenario, methods, figs / f"{part}_auc_sites.png"),
            "slice AUC per site and marker, every method",
        )
    )
    parts.append(per_site_table(rows, scenario, methods))
    parts.append(img(plot_dice_per_site(rows, scenario, methods, figs / f"{part}_dice_sites.png"), "Dice per site"))
    parts.append(img(plot_round_curves(curves, scenario, figs / f"{part}_curves.png"), "curves per round"))
    parts.append(img(plot_roc(results.roc, scenario, figs / f"{part}_roc.png"), "ROC curves"))
    parts.append(img(extra.get("shift"), "site shift"))
    parts.append(img(extra.get("overlays"), "example overlays"))
    return parts


def section_parts(section: Section | None) -> list[str]:
    """An optional section (``simulations.report.sections``) as HTML; nothing for None."""
    if section is None:
        return []
    parts = [f"<h2>{html.escape(section.title)}</h2>"]
    for block in section.blocks:
        if isinstance(block, Paragraph):
            tag = '<p class="note">' if block.note else "<p>"
            parts.append(f"{tag}{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(html_table(block.header, block.rows))
        elif isinstance(block, Figure):
            parts.append(img(block.path, block.caption))
    return parts


def privacy_parts(privacy: Sequence[dict], figs: Path) -> list[str]:
    """The epsilon each site had spent by its last round, and the budget figure."""
    parts = []
    if privacy:
        last = {}
        for r in sorted(privacy, key=lambda r: r["round"]):
            last[(r["scenario"], r["method"], r["seed"], r["site"])] = r["epsilon"]
        parts.append(
            "<h2>Privacy budget (DP-SGD)</h2><p>Epsilon each site had spent after the last round it "
            "trained (per slice: a patient contributes several slices, see docs/privacy.md).</p>"
        )
        parts.append(
            html_table(
                ["scenario", "method", "seed", "site", "epsilon"], [[*k, fmt(v)] for k, v in sorted(last.items())]
            )
        )
    parts.append(img(plot_privacy(privacy, figs / "privacy.png"), "privacy budget per site"))
    return parts


def run_parts(failures: Sequence[dict], timings: Sequence[dict]) -> list[str]:
    """Site failures and rejected updates (the first 200), and each run's time."""
    parts = []
    if failures:
        parts.append(
            "<h2>Site failures and rejected updates</h2>"
            + html_table(
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
                    for f in failures[:200]
                ],
            )
        )
    parts.append(
        "<h2>Run time</h2>"
        + html_table(
            ["scenario", "method", "seed", "seconds"],
            [[t["scenario"], t["method"], t["seed"], f"{t['seconds']:.0f}"] for t in timings],
        )
    )
    return parts


def configuration_parts(env: dict[str, Any], experiment_text: str) -> list[str]:
    """The environment and the experiment as run, so that the page says how to repeat it."""
    return [
        "<h2>Configuration and versions</h2><p>Repeat with the same command on the same commit; "
        "<code>experiment.toml</code> beside this report is the experiment as run.</p>",
        f"<pre>{html.escape(json.dumps(json_safe(env), indent=1))}</pre>",
        f"<pre>{html.escape(experiment_text)}</pre>",
    ]


def per_site_table(rows: Sequence[dict], scenario: str, methods: Sequence[str]) -> str:
    """Sites x methods: slice macro-AUC and Dice (means over seeds)."""
    sites = sorted({r["site"] for r in select(rows, scenario=scenario)})
    body = []
    for site in sites:
        cells = [site]
        for m in methods:
            cells.append(auc_and_dice(rows, scenario, m, site, " / "))
        body.append(cells)
    return "<p>Per site: macro-AUC (slices) / Dice.</p>" + html_table(["site"] + list(methods), body)
