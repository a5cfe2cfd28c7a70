"""Clinic inference time per 30-slice 512x512 study on this CPU, per preset (issue: joint model).

Times ``client.inference.predict.predict_study`` end to end (DICOM read, preprocessing, model on the
slices that show brain, batched, ``torch.inference_mode``), with and without channels_last.
Weights are random: the time does not depend on them. Run: ``python -m benchmarks.bench_inference``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from client.inference.predict import predict_study
from common.checkpoint import Checkpoint
from common.config import PreprocessConfig
from common.model import build_joint_model
from common.presets import get_preset
from tests.helpers.data import head_phantom, write_series


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["small", "paper"])
    ap.add_argument("--slices", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        hu = head_phantom((args.slices, 512, 512))
        hu[:3] = -1000.0  # slices above the vertex: skipped (no brain)
        write_series(study, hu, spacing=(5.0, 0.45, 0.45))
        warm = Path(tmp) / "warm"
        write_series(warm, hu[10:13], spacing=(5.0, 0.45, 0.45), seed=1)
        print(f"{args.slices}-slice 512x512 study, {torch.get_num_threads()} threads")
        for name in args.presets:
            mcfg = get_preset(name)
            for channels_last in (False, True):
                model = build_joint_model(mcfg, seed=0).eval()
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                ckpt = Checkpoint(mcfg, PreprocessConfig(size=mcfg.image_size), mcfg.output_names, {}, {})
                predict_study(warm, ckpt, model=model, batch_size=8)  # warm-up on 3 slices
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    pred = predict_study(study, ckpt, model=model, batch_size=8)
                    times.append(time.perf_counter() - t0)
                print(
                    f"{name:6s} ({mcfg.image_size}px){' channels_last' if channels_last else '              '}: "
                    f"{min(times):6.2f} s per study ({len(pred.brain_slices)} slices with brain scored)"
                )


if __name__ == "__main__":
    main()
