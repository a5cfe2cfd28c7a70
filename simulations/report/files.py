"""The report's data files: ``metrics.json``, the CSVs and ``experiment.toml``, and the environment
(versions, commit) that makes a run repeatable.

``metrics.json``: ``{"experiment", "rows": [{scenario, method, seed, site, marker, metric, value}],
"summary", "paper", "curves", "sites", "timings", "failures", "privacy", "environment"}``; NaN is
written as null.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from simulations.report.tables import HEADLINE_METRICS, LONG_COLUMNS


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
    repo = Path(__file__).resolve().parents[2]
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
    """Write ``rows`` as CSV with these ``columns`` (other keys left out)."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def json_safe(o: Any) -> Any:
    """``o`` with NaN as None and numpy scalars as Python numbers, for strict JSON."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return json_safe(o.item())
    return o


def write_data(
    out_dir: Path,
    exp,
    results,
    summary: Sequence[dict],
    paper: Sequence[dict],
    env: dict[str, Any],
    experiment_text: str,
) -> None:
    """Write ``experiment.toml``, ``metrics.json`` and the CSVs (long table, summary, curves) into ``out_dir``."""
    rows, curves = results.rows, results.curves
    (out_dir / "experiment.toml").write_text(experiment_text)
    doc = {
        "experiment": {
            "name": exp.name,
            "description": exp.description,
            "seeds": list(exp.seeds),
            "budget": exp.budget.__dict__,
            "source": exp.source,
            "methods": [
                {
                    "name": m.name,
                    "kind": m.kind,
                    "run_config": exp.method_run_config(m),
                    "split_by": m.split_by,
                    **({"scope": m.scope, "unet_from": m.unet_from} if m.kind == "radiomics" else {}),
                }
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
        "selections": results.selections,
        "environment": env,
    }
    (out_dir / "metrics.json").write_text(json.dumps(json_safe(doc), indent=1))
    write_csv(out_dir / "metrics.csv", rows, LONG_COLUMNS)
    write_csv(
        out_dir / "summary.csv",
        summary,
        ["scenario", "method", "sites", "seeds"] + [k for m in HEADLINE_METRICS for k in (m, f"{m}_sd")],
    )
    write_csv(out_dir / "curves.csv", curves, ("scenario", "method", "seed", "round", "stage") + HEADLINE_METRICS)


#: The README block that ``simulate.py --results`` rewrites (never edited by hand).
README_START, README_END = "<!-- results:start (simulate.py --results) -->", "<!-- results:end -->"


#: What of a report folder goes beside a published headline (``publish_artifacts``): the numbers and the
#: pictures a reader of the README looks at.
PUBLISHED_FILES = ("ceiling.json", "round_cost.json", "study_metrics.json", "summary.csv", "validation_curve.json")
PUBLISHED_FIGURES = ("_ceiling.png", "_overlays.png", "_reliability.png", "_study_curves.png")


def publish_artifacts(out_dir: Path, results_file: Path, console: str) -> Path:
    """Copy the run's numbers and figures (``PUBLISHED_FILES``, ``PUBLISHED_FIGURES``) and its console
    output into the folder beside ``results_file`` (``headline.md`` -> ``headline/``), emptied first, so
    that everything published is written by the command, nothing by hand."""
    folder = results_file.with_suffix("")
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in PUBLISHED_FILES:
        if (out_dir / name).is_file():
            shutil.copy2(out_dir / name, folder / name)
    for fig in sorted((out_dir / "figures").glob("*.png")):
        if fig.name.endswith(PUBLISHED_FIGURES):
            shutil.copy2(fig, folder / fig.name)
    (folder / "console.txt").write_text(console)
    return folder


def publish_results(text: str, results_file: Path, readme: Path | None = None) -> list[Path]:
    """Write the study-level headline (markdown) to ``results_file`` and, with ``readme``, replace
    the README's results block (between ``README_START`` and ``README_END``) with it.
    ValueError when the README has no such block."""
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(text)
    written = [results_file]
    if readme is not None:
        doc = readme.read_text()
        start, end = doc.find(README_START), doc.find(README_END)
        if start < 0 or end < start:
            raise ValueError(f"{readme}: no results block ({README_START} ... {README_END})")
        readme.write_text(doc[: start + len(README_START)] + "\n" + text + doc[end:])
        written.append(readme)
    return written
