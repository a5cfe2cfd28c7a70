"""The benchmark scripts run (tiny sizes on the CPU), so the GPU and clinic figures can be rerun as they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_gpu_train, bench_inference


def test_bench_gpu_train_runs_on_the_cpu(capsys) -> None:
    rows = bench_gpu_train.main(
        ["--device", "cpu", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2"]
    )
    assert [(r["stage"], r["loop"]) for r in rows] == [
        (s, loop) for s in (1, 2) for loop in ("plain fp32", "train_stage fp32", "train_stage bf16")
    ]
    assert all(r["images_per_s"] > 0 and r["flops_per_image"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0 and "x" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_inference_prints_every_step(capsys) -> None:
    bench_inference.main(
        ["--presets", "tiny", "--slices", "8", "--matrix", "64", "--calibration-matrix", "64", "--repeats", "1"]
    )
    out = capsys.readouterr().out
    for label, _ in bench_inference.steps(Path("x"), Path("y")):
        assert label in out
    assert "Grad-CAM" in out and "read DICOM" in out


def _entry(method: str, seed: int, patients: list[str], logits: list[float]) -> dict:
    import numpy as np

    from common.config import MARKERS
    from common.study_metrics import StudyOutputs

    n, m = len(patients), len(MARKERS)
    labels = np.tile(np.arange(n) % 2, (m, 1)).T.astype(float)  # alternate negatives and positives
    outputs = StudyOutputs(
        MARKERS,
        np.asarray([f"st{i}" for i in range(n)]),
        np.asarray(patients),
        np.asarray(["site-01"] * n),
        labels,
        np.tile(np.asarray(logits, dtype=float), (m, 1)).T,
        np.zeros(n, dtype=bool),
    )
    return {
        "scenario": "s",
        "method": method,
        "seed": seed,
        "site": "site-01",
        "outputs": outputs,
        "temperature": np.ones(m),
        "thresholds": np.full(m, 0.5),
        "dice_counts": {},
    }


def test_reproducibility_compares_test_patients_and_macro_auroc_per_seed() -> None:
    from benchmarks.bench_reproducibility import compare

    a = [_entry("fedavg", 0, ["p1", "p2", "p3", "p4"], [0.1, 0.9, 0.2, 0.8])]  # AUROC 1
    b = [
        _entry("fedavg", 0, ["p1", "p2", "p3", "p4"], [0.9, 0.1, 0.2, 0.8])
    ]  # AUROC 0.25: 1 of 4 (pos, neg) pairs ordered
    problems, figures = compare(a, b + [_entry("fedavg", 1, ["p9", "p8"], [0.0, 1.0])])  # seed 1: only in B, ignored
    assert problems == []
    assert figures == [(("s", "fedavg", 0), 1.0, 0.25)]
    moved = [_entry("fedavg", 0, ["p1", "p2", "p3", "p5"], [0.1, 0.9, 0.2, 0.8])]
    problems, _ = compare(a, moved)
    assert problems == ["('s', 'fedavg', 0, 'site-01'): 2 test patient(s) differ"]


def test_reproducibility_compares_every_figure_to_the_tolerance(tmp_path, capsys) -> None:
    """Every method's figures (AUROCs, temperatures, thresholds, each study's logit, metrics.csv rows):
    two runs 1e-7 apart pass at the default 1e-6, 1e-4 apart fail, naming the figure."""
    import json

    from benchmarks.bench_reproducibility import main
    from simulations.report.studies import to_json

    patients, logits = ["p1", "p2", "p3", "p4"], [0.1, 0.9, 0.2, 0.8]
    rows = "scenario,method,seed,site,marker,metric,value\ns,fedavg,0,site-01,,dice,{}\n"
    for name, shift, dice in (("a", 0.0, 0.5), ("b", 1e-7, 0.5), ("c", 1e-4, 0.5), ("d", 0.0, 0.6)):
        run = tmp_path / name
        run.mkdir()
        entries = [_entry("fedavg", 0, patients, [x + shift for x in logits]), _entry("local", 0, patients, logits)]
        (run / "studies.json").write_text(json.dumps(to_json(entries)))
        (run / "metrics.csv").write_text(rows.format(dice))
    a = str(tmp_path / "a")
    assert main([a, a]) == 0 and "largest |A - B| over" in capsys.readouterr().out
    assert main([a, str(tmp_path / "b")]) == 0
    assert "1.00e-07" in capsys.readouterr().out
    assert main([a, str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "site-01 p" in out and " logit" in out and "ABOVE 1e-06" in out
    assert main([a, str(tmp_path / "d")]) == 1 and "site-01 dice" in capsys.readouterr().out


def test_bench_difficulty_help_and_errors(capsys, tmp_path) -> None:
    from benchmarks import bench_difficulty
    from simulations.experiment import load_experiment

    with pytest.raises(SystemExit) as done:
        bench_difficulty.main(["--help"])
    assert done.value.code == 0 and "--local-steps" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no truth"):
        bench_difficulty.main(["--data", str(tmp_path)])
    with pytest.raises(
        ValueError, match=r"'fedavg\+imbalance' is not a pooled or local method; choose from \['local', 'pooled'\]"
    ):
        bench_difficulty.one_run(load_experiment("default"), "fedavg+imbalance", 0, None, None)
    exp = bench_difficulty.one_run(load_experiment("default"), "pooled", 3, 5, [2, 1])
    assert (exp.seeds, [m.name for m in exp.methods], len(exp.scenarios)) == ((3,), ["pooled"], 1)
    assert (exp.budget.local_steps, exp.budget.rounds_stage1, exp.budget.rounds_stage2) == (5, 2, 1)


@pytest.mark.slow
def test_bench_difficulty_runs_the_pooled_method_and_prints_the_ceiling(synthetic_root, tmp_path, capsys) -> None:
    import json

    from benchmarks import bench_difficulty
    from common.config import MARKERS
    from tests.helpers.experiments import BASELINES, TINY_WIDE_TEST

    exp = tmp_path / "exp.toml"
    exp.write_text(TINY_WIDE_TEST.format(seeds="[0]", methods=BASELINES, extra_scenarios=""))
    out = tmp_path / "out"
    argv = ["--data", str(synthetic_root), "--experiment", str(exp), "--out", str(out), "--boot", "20"]
    md = tmp_path / "difficulty.md"
    run = [*argv, "--local-steps", "3", "--rounds", "1", "1", "--device", "cpu", "--results", str(md)]
    assert bench_difficulty.main(run) == 0
    printed = capsys.readouterr().out
    assert "1 + 1 rounds x 3 steps x 3 sites" in printed and "expansion by marker count (true)" in printed
    doc = json.loads((out / "difficulty.json").read_text())
    assert doc["budget"]["train.local-steps"] == 3 and doc["method"] == "pooled"
    rows = doc["ceiling"]["natural"]
    assert [r["label"] for r in rows] == list(MARKERS) and {r["method"] for r in rows} == {"pooled"}
    assert all(m in printed for m in MARKERS)
    text = md.read_text()  # the markdown holds the command and one table row per label, as the JSON
    assert f"bench_difficulty {' '.join(run)}" in text
    for r in rows:
        assert f"| pooled | {r['label']} | {r['n']} | {r['reader_pos']} | {r['true_pos']} |" in text


@pytest.mark.slow
def test_bench_gan_federated_writes_both_designs_rounds(tmp_path, capsys) -> None:
    from benchmarks import bench_gan

    out = tmp_path / "cost.txt"
    bench_gan.main(["--federated", "--sites", "2", "--gan-rounds", "1", "--gan-local-steps", "1", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# python -m benchmarks.bench_gan --federated")
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[2]) for r in rows] == [("i", "1"), ("i", "gan"), ("i", "2"), ("ii", "1"), ("ii", "2")]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 and r[7] == "0" for r in rows)
    assert capsys.readouterr().out == out.read_text()


def test_bench_dice_help_and_a_missing_report(tmp_path, capsys) -> None:
    from benchmarks import bench_dice

    with pytest.raises(SystemExit) as done:
        bench_dice.main(["--help"])
    assert done.value.code == 0 and "studies.json" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="studies.json"):
        bench_dice.main([str(tmp_path)])


def test_bench_simulate_tables_a_finished_runs_cpu_and_wall(tmp_path, capsys):
    """``--from-run``: each method's machine CPU seconds beside its wall seconds and thread plan,
    from the run's own metrics.json (the ratio computed here independently)."""
    from benchmarks.bench_simulate import main as bench_simulate_main
    from simulations.experiment import EXPERIMENTS_DIR

    run = tmp_path / "default-1"
    run.mkdir()
    (run / "experiment.toml").write_text((EXPERIMENTS_DIR / "default.toml").read_text())
    timings = [
        {"scenario": "natural", "method": "pooled", "seed": 0, "seconds": 100.0, "cpu_seconds": 190.0},
        {"scenario": "natural", "method": "fedavg+imbalance", "seed": 0, "seconds": 150.0, "cpu_seconds": 240.0},
    ]
    (run / "metrics.json").write_text(json.dumps({"timings": timings, "environment": {"git_commit": "abc1234"}}))
    out = tmp_path / "cpu.md"
    assert bench_simulate_main(["--from-run", str(run), "--threads", "2", "--results", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    pooled = next(line for line in lines if " pooled " in line)
    fed = next(line for line in lines if "fedavg+imbalance" in line)
    assert f"{190 / 100:.2f}" in pooled and "1 process x 2 thread(s)" in pooled
    assert f"{240 / 150:.2f}" in fed and "x 1 thread" in fed
    assert "abc1234" in out.read_text() and "busy cores" in out.read_text()
