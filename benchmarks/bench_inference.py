"""Clinic scoring time per 30-slice 512x512 study on this CPU, step by step, with agreement to the plain path.

Each row is ``client.inference.predict.predict_study`` end to end (DICOM read, preprocessing, model) with one
more fast-path option than the row above (``client.inference.fast.InferenceOptions``): the plain fp32
PyTorch path (every brain slice through U-Net and classifier), channels_last, the classifier only on
slices with predicted hematoma, ONNX Runtime, int8 U-Net, int8 classifier (static, calibrated on a
phantom site cache). Per row: median wall time over ``--repeats`` studies, the process CPU time (on a
loaded machine, CPU time / threads estimates the quiet wall time), and agreement with the plain path:
max |delta| of the study's marker probabilities and the Dice between the two paths' masks. Before the rows:
reading + preprocessing alone; after them, one-off costs (ONNX export, int8 calibration, session start)
and Grad-CAM (what ``run_prediction`` adds for the overlay).

Random weights, unless ``--checkpoint``: the mask head is shifted so that ``--hematoma-slices`` slices
hold predicted hematoma (a typical hemorrhage spans 3-10 slices of 5 mm), since the classifier's share of
the time depends on that count. Agreement is only meaningful for a trained model's decisive masks; the
tests check it on a trained tiny model. Run: ``python -m benchmarks.bench_inference`` (all presets and steps).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from client.data.cache import build_site_cache
from client.data.dataset import MIN_BRAIN_FRACTION
from client.inference.backends import make_scorer
from client.inference.fast import REFERENCE, InferenceOptions, SegmentPart, scale_slices
from client.inference.predict import StudyPrediction, grad_cam, predict_study, study_pixel_mm
from client.ingest.dicom import read_study
from client.preprocessing.pipeline import preprocess_volume
from common.checkpoint import Checkpoint, build_from_checkpoint, load_checkpoint
from common.config import PreprocessConfig
from common.model import JointModel, build_joint_model
from common.presets import get_preset
from tests.helpers.data import head_phantom, write_series, write_site

SPACING = (5.0, 0.45, 0.45)


def steps(calibration: Path, tmp: Path) -> list[tuple[str, InferenceOptions]]:
    """The fast-path steps, each adding one option to the previous one (ONNX exports kept in ``tmp``)."""
    torch_fast = replace(REFERENCE, channels_last=True)
    onnx = InferenceOptions(backend="onnx", cache_dir=tmp / "onnx")
    return [
        ("plain fp32 PyTorch, all brain slices", REFERENCE),
        ("+ channels_last", torch_fast),
        ("+ classifier on hematoma slices only", replace(torch_fast, classify="hematoma")),
        ("ONNX Runtime fp32", onnx),
        ("+ int8 U-Net", replace(onnx, int8=("segment",), calibration=calibration)),
        ("+ int8 classifier", replace(onnx, int8=("segment", "classify"), calibration=calibration)),
    ]


def clock(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall s, process CPU s, result) of one call."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def shift_mask_head(model: JointModel, slices: np.ndarray, n_hematoma: int, min_pixels: int) -> None:
    """Shift a random model's mask bias so that about ``n_hematoma`` slices hold hematoma."""
    seg = SegmentPart(model.eval())
    with torch.inference_mode():
        logits = torch.cat(
            [seg(torch.from_numpy(scale_slices(slices[i : i + 4])))[0] for i in range(0, len(slices), 4)]
        )
    inside = torch.from_numpy(slices > 0).flatten(1)  # the background is alike on every slice: leave it out
    logits = logits.flatten(1).masked_fill(~inside, float("-inf"))
    # a slice holds hematoma when more than min_pixels of its pixels have a positive mask logit, i.e.
    # when its (min_pixels + 1)-th largest logit is positive: shift that value of the n-th slice below 0
    v = logits.topk(min_pixels + 1, dim=1).values[:, -1].sort(descending=True).values
    n = min(max(n_hematoma, 1), len(v) - 1)
    with torch.no_grad():
        model.unet.segmentation_head[0].bias -= float(v[n - 1] + v[n]) / 2


def scored(pred: StudyPrediction) -> int:
    """Slices the classifier ran on."""
    return int((~np.isnan(pred.slice_scores).any(axis=1)).sum())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; 1 when both are empty (the two paths agree: no hematoma)."""
    a, b = a > 0.5, b > 0.5
    total = int(a.sum() + b.sum())
    return 2 * float((a & b).sum()) / total if total else 1.0


def bench_preset(name: str, args: argparse.Namespace, study: Path, warm: Path, tmp: Path) -> None:
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        mcfg = ckpt.model_config
        model = build_from_checkpoint(ckpt, "cpu")
    else:
        mcfg = get_preset(name)
        ckpt = Checkpoint(mcfg, PreprocessConfig(size=mcfg.image_size), mcfg.output_names, {}, {})
        model = build_joint_model(mcfg, seed=0)
    pre_cfg = ckpt.preprocess
    t_pre, c_pre, pre = clock(lambda: preprocess_volume(read_study(study).volume, None, pre_cfg))
    if not args.checkpoint:
        brain = pre.slices[pre.brain_fraction >= MIN_BRAIN_FRACTION]
        shift_mask_head(model, brain, args.hematoma_slices, pre_cfg.min_mask_pixels)
    if args.calibration:  # the site's own cache, as `hemexp predict --int8 --calibration` takes it
        calibration = args.calibration
    else:
        shape = (8, args.calibration_matrix, args.calibration_matrix)
        site = write_site(tmp / f"site-{name}", n_studies=2, shape=shape)
        calibration = build_site_cache(site, tmp / f"cache-{name}", pre_cfg)[0].path
    print(f"\n{name} ({mcfg.image_size} px), {torch.get_num_threads()} threads")
    print(f"  {'read DICOM + preprocess':42s} {t_pre:6.2f} s wall {c_pre:6.2f} s CPU")
    ref = None
    for label, options in steps(calibration, tmp)[args.skip : args.steps or None]:
        t_make, _, scorer = clock(lambda options=options: make_scorer(model, "cpu", options))
        predict_study(warm, ckpt, model=model, options=options, scorer=scorer)
        runs = [
            clock(
                lambda options=options, scorer=scorer: predict_study(
                    study, ckpt, model=model, options=options, scorer=scorer
                )
            )
            for _ in range(args.repeats)
        ]
        pred = runs[-1][2]
        ref = ref or pred
        delta = max(abs(pred.markers[k] - ref.markers[k]) for k in ref.markers)
        print(
            f"  {label:42s} {statistics.median(r[0] for r in runs):6.2f} s wall "
            f"{statistics.median(r[1] for r in runs):6.2f} s CPU  classified {scored(pred):2d}"
            f"/{len(pred.brain_slices)} slices  max|dp| {delta:.4f}  mask Dice vs plain "
            f"{dice(pred.mask_probability, ref.mask_probability):.4f}  (set-up {t_make:.1f} s)",
            flush=True,
        )
    k = (ref.hematoma_slices or ref.brain_slices)[0]
    pixel_mm = study_pixel_mm(ref.geometry, ref.slices.shape[-1])
    t_cam, c_cam, _ = clock(lambda: grad_cam(model, ref.slices[k], 0, pixel_mm))
    print(f"  {'Grad-CAM of one slice (run_prediction)':42s} {t_cam:6.2f} s wall {c_cam:6.2f} s CPU")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["small", "paper"])
    ap.add_argument("--slices", type=int, default=30)
    ap.add_argument("--matrix", type=int, default=512, help="the study's DICOM matrix")
    ap.add_argument("--calibration-matrix", type=int, default=256, help="matrix of the phantom calibration site")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hematoma-slices", type=int, default=8)
    ap.add_argument("--steps", type=int, default=0, help="only the first N steps (0: all)")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N steps (agreement is then to the first run)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a trained checkpoint instead of random weights")
    ap.add_argument("--study", type=Path, default=None, help="score this DICOM study instead of the phantom")
    ap.add_argument("--calibration", type=Path, default=None, help="site cache calibrating int8 (default: a phantom)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hu = head_phantom((args.slices, args.matrix, args.matrix))
        hu[:3] = -1000.0  # slices above the vertex: skipped (no brain)
        write_series(tmp / "study", hu, spacing=SPACING)
        mid = args.slices // 2
        write_series(tmp / "warm", hu[mid - 1 : mid + 2], spacing=SPACING, seed=1)  # 3 slices to warm up on
        study = args.study or tmp / "study"
        shape = read_study(study).volume.shape
        print(f"{shape[0]}-slice {shape[1]}x{shape[2]} study ({study.name}), torch {torch.__version__}")
        for name in [args.checkpoint.stem] if args.checkpoint else args.presets:
            bench_preset(name, args, study, tmp / "warm", tmp)


if __name__ == "__main__":
    main()
