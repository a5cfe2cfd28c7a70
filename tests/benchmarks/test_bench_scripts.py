"""The benchmark scripts run (tiny sizes on the CPU), so the GPU and clinic figures can be rerun as they are."""

from __future__ import annotations

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
