"""``python simulations/simulate.py``: run an experiment (federated strategies beside local-only and
pooled baselines, same seeds and budget) and write its report.

With no argument it generates the built-in synthetic 12-site dataset (or reuses it) and runs the
``default`` experiment on Flower's simulation engine. ``--experiment NAME|FILE`` picks another
(``simulations/experiments/*.toml``), ``--data`` the dataset (a folder of site folders), ``--out``
where ``<name>-<timestamp>/`` with ``report.html``, ``metrics.json`` and CSVs goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

from simulations.experiment import Experiment, load_experiment

DEFAULT_DATA = Path("data/synthetic")
#: The built-in dataset the first command generates: the full benchmark (``hemexp generate``'s
#: patients: 12 sites, ~1,050 patients, >= 30 reader-positive test studies per marker; markers with
#: severities, mimics, reader noise; docs/synthetic-data.md) at a 64 px reference matrix (the
#: generator's default is 96: the models see 64 px at the tiny preset, and writing and caching
#: 50,000 smaller files keeps the first command within 10 minutes on 2 cores).
BUILT_IN_DATASET = {"matrix": 64}


def ensure_data(data_root: Path, generate: bool, log=print) -> bool:
    """Generate the built-in synthetic dataset where ``data_root`` does not exist yet.
    Returns whether the data are (hemexp's) synthetic data."""
    if not data_root.exists():
        if not generate:
            raise FileNotFoundError(
                f"{data_root}: data folder does not exist (give --data, or --generate to make "
                "the built-in synthetic dataset there)"
            )
        from simulations.synthetic import generate_dataset

        log(f"generating the synthetic 12-site dataset in {data_root} (once; reused by later runs)")
        log(generate_dataset(data_root, progress=True, **BUILT_IN_DATASET).describe())
    return (data_root / "dataset.json").is_file()


def run_experiment(
    exp: Experiment,
    data_root: Path,
    out_root: Path,
    log=print,
    generate: bool = True,
    experiment_text: str = "",
    threads: int = 0,
    ray_address: str | None = None,
    results_file: Path | None = None,
    readme: Path | None = None,
    n_boot: int = 2000,
    gan_samples: int | None = None,
) -> Path:
    """Everything ``simulate.py`` does; returns the report's path. ``ray_address``: run the virtual
    SuperNodes on that existing Ray cluster (``simulations.engine.SimulationEngine``). ``results_file``
    (and ``readme``): where the study-level headline goes as markdown (``simulations.report.files.publish_results``).
    ``gan_samples``: crops per set in the report's GAN figures (``simulations.runner.Runner``)."""
    from common.runtime import usable_cores, use_torch_threads
    from simulations.engine import SimulationEngine
    from simulations.report.ceiling_section import console as ceiling_console
    from simulations.report.ceiling_section import read_ceiling, write_ceiling
    from simulations.report.figures import plot_overlays, plot_site_shift
    from simulations.report.files import environment, publish_artifacts, publish_results
    from simulations.report.html import write_report
    from simulations.report.studies import console, markdown, study_tables
    from simulations.report.tables import slug, summarise, text_summary
    from simulations.runner import Runner, describe_sites, iterate_cases

    t0 = time.perf_counter()
    lines: list[str] = []  # the console output, published beside results_file
    log = _teed(log, lines)
    data_root, out_root = data_root.resolve(), out_root.resolve()  # Flower's processes run in other folders
    synthetic = ensure_data(data_root, generate, log)
    out_dir = out_root / f"{exp.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    figures = out_dir / "figures"
    figures.mkdir(parents=True)
    log(
        f"experiment {exp.name}: {len(exp.scenarios)} scenario(s) x {len(exp.seeds)} seed(s) x {len(exp.methods)} "
        f"method(s); output {out_dir}"
    )
    use_torch_threads(threads)  # the baselines run in this process, alone; federated sites in Ray workers
    federated = any(m.needs_engine for m in exp.methods)
    engine_ctx = SimulationEngine(out_dir / "engine", ray_address=ray_address) if federated else nullcontext()
    with engine_ctx as engine:
        runner = Runner(exp, out_dir, log, engine, gan_samples=gan_samples)
        extra: dict[str, dict] = {}
        for case, methods in iterate_cases(exp, data_root, out_dir, log):
            log(f"\n== {case.name} | seed {case.seed} | {len(case.plans)} training site(s)")
            sites = runner.results.sites.setdefault(case.name, describe_sites(case))
            pictures = extra.setdefault(case.name, {})
            if "shift" not in pictures:
                caches = {p.site_id: c for p, c in zip(case.plans, case.caches)}
                pictures["shift"] = plot_site_shift(sites, caches, figures / f"{slug(case.name)}_shift.png")
            for k, method in enumerate(methods, 1):
                log(f"[{k}/{len(methods)}] {method.name} ({method.kind})")
                runner.run_method(case, method)
            if "overlays" not in pictures:
                examples = [(e.site_id, e.data[_hematoma_slice(e.data)]) for e in case.evaluate[:8] if len(e.data)]
                pictures["overlays"] = plot_overlays(
                    _overlay_model(runner, case.name, exp), examples, figures / f"{slug(case.name)}_overlays.png"
                )
    # the pooled validation score of every selectable round: the learning curves (benchmarks.bench_learning_curve)
    (out_dir / "validation_curve.json").write_text(json.dumps(runner.results.validation, indent=1))
    tables = study_tables(runner.results.studies, n_boot, comparisons=exp.comparisons)
    env = environment()
    ceiling = write_ceiling(out_dir, data_root, runner.results.studies, figures, n_boot)  # generated data only
    sections = [ceiling] if ceiling is not None else []
    report = write_report(
        out_dir, exp, runner.results, extra, env, synthetic, experiment_text, tables, sections, n_boot
    )
    log("\n" + text_summary(summarise(runner.results.rows), runner.results.rows))
    for scenario, t in tables.items():
        log("\n" + console(t["headline"], scenario))
    for scenario, rows in read_ceiling(out_dir).items():
        log("\n" + ceiling_console(rows, scenario))
    if results_file is not None:
        seeds = ", ".join(str(s) for s in exp.seeds)
        text = "".join(
            markdown(
                t["headline"],
                t["paired"],
                f"{exp.name}: {scenario} (seeds {seeds}; {n_boot} bootstrap replicates)",
                t["planned"],
            )
            for scenario, t in tables.items()
        )
        text += (
            f"\nWritten by `python {env['command']}` (experiment {exp.name}, data {data_root.name}) at commit "
            f"{env['git_commit'][:10]}{' + local changes' if env['git_dirty'] else ''}, in "
            f"{time.perf_counter() - t0:.0f} s on {usable_cores()} CPU(s), training and evaluation included.\n"
        )
        for path in publish_results(text, results_file, readme):
            log(f"wrote {path}")
    log(f"\nfinished in {time.perf_counter() - t0:.0f} s; report: {report}")
    if results_file is not None:
        publish_artifacts(report.parent, results_file, "\n".join(lines) + "\n")
    return report


def _teed(log, lines: list[str]):
    """``log``, also appending every message to ``lines``."""

    def both(message: str) -> None:
        lines.append(message)
        log(message)

    return both


def _hematoma_slice(ds) -> int:
    import numpy as np

    pixels = ds.hematoma_pixels()
    return int(np.argmax(pixels)) if len(pixels) else 0


def _overlay_model(runner, scenario: str, exp: Experiment):
    """The model of the first federated method (else the first method) for the overlay picture."""
    order = [m.name for m in exp.methods if m.kind == "federated"] + [m.name for m in exp.methods]
    for name in order:
        model = runner.results.models.get(f"{scenario}/{name}")
        if model is not None:
            return model
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="default", help="a bundled experiment's name or a TOML file")
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="folder of site folders (default: %(default)s, generated there when missing)",
    )
    p.add_argument("--out", type=Path, default=Path("runs"), help="reports go to OUT/<experiment>-<timestamp>/")
    p.add_argument("--seeds", type=int, nargs="+", help="override the experiment's seeds")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of the local and pooled baselines (default %(default)s, the cores this process may use: "
        "common.runtime.usable_cores; they run alone: give 1 on a machine whose other cores are busy, where small "
        "convolutions slow down on more). Federated sites: one thread per Ray worker, one worker per core",
    )
    p.add_argument("--no-generate", action="store_true", help="fail instead of generating missing data")
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the virtual SuperNodes on this existing Ray cluster (its head's GCS address, as "
        "`ray start --head` prints it; every node needs this environment and the data at the same path); "
        "default: a Ray of the simulation's own",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="also write the study-level headline (markdown) here, e.g. benchmarks/results/headline.md",
    )
    p.add_argument("--readme", type=Path, default=None, help="with --results: rewrite this README's results block too")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap replicates of the intervals (default %(default)s)")
    p.add_argument(
        "--gan-samples",
        type=int,
        default=None,
        metavar="N",
        help="methods with gan.augment-ratio > 0: at most N training and N held-out crops per site enter the "
        "report's GAN figures (default 256; 0: no GAN section)",
    )
    args = p.parse_args(argv)
    try:
        exp = load_experiment(args.experiment)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.seeds:
        from dataclasses import replace

        exp = replace(exp, seeds=tuple(args.seeds))
    text = Path(exp.source).read_text() if exp.source else ""
    generate = not args.no_generate and args.data == DEFAULT_DATA
    try:
        run_experiment(
            exp,
            args.data,
            args.out,
            generate=generate,
            experiment_text=text,
            threads=args.threads,
            ray_address=args.ray_address,
            log=lambda s: print(s, flush=True),
            results_file=args.results,
            readme=args.readme,
            n_boot=args.boot,
            gan_samples=args.gan_samples,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
