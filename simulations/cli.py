"""``hemexp``: the research and clinic tool (generate data, check, convert, train, predict).

Thin shell over the library; it lives on the research side because it reaches every package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.site_tools.cli import add_check_command, add_prepare_command, dispatch


def run_generate(args: argparse.Namespace) -> int:
    from simulations.synthetic import generate_dataset

    summary = generate_dataset(
        args.out,
        n_sites=args.sites,
        seed=args.seed,
        matrix=args.matrix,
        studies_scale=args.scale,
        progress=True,
        overwrite=args.overwrite,
    )
    print(summary.describe())
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from client.ingest.convert import convert_study
    from client.ingest.dicom import StudyError

    try:
        path = convert_study(args.study_dir, args.out)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p.path}: {p.reason}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def run_rsna_site(args: argparse.Namespace) -> int:
    from simulations.rsna import convert_rsna

    try:
        result = convert_rsna(args.src, args.out, link=args.link, progress=True)
    except (FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in result.problems:
        print(f"problem: {p.path}: {p.reason}", file=sys.stderr)
    print(result.describe())
    return 0 if result.n_studies else 1


def run_train(args: argparse.Namespace) -> int:
    from client.training.train import TrainConfig
    from common.config import PreprocessConfig
    from common.presets import get_preset
    from common.runtime import resolve_device
    from simulations.baselines import FitConfig, run_pooled
    from simulations.sites import prepare_caches

    model_cfg = get_preset(args.preset, **({"image_size": args.size} if args.size else {}))
    pre = PreprocessConfig(
        size=model_cfg.image_size,
        denoise=not args.no_denoise,
        strip_skull=not args.no_skull_strip,
        centre=not args.no_centre,
    )
    caches, problems = prepare_caches(args.data, pre, args.cache_dir)
    if problems:
        print(f"{len(problems)} data problem(s) (run 'hemexp check SITE_DIR' for the list)", file=sys.stderr)
    fit = FitConfig(
        epochs_stage1=args.epochs1 if args.epochs1 is not None else args.epochs,
        epochs_stage2=args.epochs2 if args.epochs2 is not None else args.epochs,
        train=TrainConfig(batch_size=args.batch_size, lr=args.lr, seed=args.seed, augment=not args.no_augment),
        lr_stage2=args.lr2,
        split_by=args.split,
    )
    metrics = run_pooled(caches, model_cfg, pre, fit, args.out, resolve_device(args.device))
    t = metrics["test"]
    print(
        f"test: dice {t['dice']:.3f}, macro-AUC (study) {t['macro_auc_study']:.3f}, volume MAE {t['volume_mae_ml']:.2f} ml"
    )
    print(f"wrote {args.out}/checkpoint.pt, metrics.json, curves.png")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from client.inference.predict import run_prediction
    from client.ingest.dicom import StudyError
    from common.runtime import resolve_device

    try:
        result = run_prediction(
            args.study_dir,
            args.model,
            args.out,
            str(resolve_device(args.device)),
            tuple(args.window) if args.window else None,
            args.site_norms,
        )
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p.path}: {p.reason}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    markers = ", ".join(
        f"{k} {v['probability']:.2f} ({v['present']} at {v['threshold']:.2f})" for k, v in result["markers"].items()
    )
    print(f"{markers}; hematoma {result['volume_ml']:.1f} ml; wrote {args.out}/prediction.json and overlay.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hemexp", description="hemexp: hematoma-expansion markers on head CT")
    sub = parser.add_subparsers()
    g = sub.add_parser("generate", help="write the synthetic multi-site CT dataset (DICOM + NIfTI + labels)")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--sites", type=int, default=12)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--matrix", type=int, default=128, help="nominal in-plane matrix (sites vary around it)")
    g.add_argument("--scale", type=float, default=1.0, help="multiply every site's number of studies")
    g.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    g.set_defaults(func=run_generate)
    add_check_command(sub)
    add_prepare_command(sub)
    c = sub.add_parser("convert", help="write a DICOM study's HU volume as NIfTI (RAS+ affine)")
    c.add_argument("study_dir", type=Path)
    c.add_argument("out", type=Path)
    c.set_defaults(func=run_convert)
    r = sub.add_parser("rsna-site", help="arrange RSNA 2019 ICH training images as a site folder (docs/public-data.md)")
    r.add_argument("src", type=Path, help="folder with stage_2_train/ and stage_2_train.csv")
    r.add_argument("out", type=Path, help="the new site folder: dicom/<PatientID>/<StudyInstanceUID>/, labels.csv")
    r.add_argument("--link", choices=("symlink", "hardlink", "copy"), default="symlink", help="how images reach OUT")
    r.set_defaults(func=run_rsna_site)
    t = sub.add_parser("train", help="pooled (centralised) two-stage training over every site of DATA_ROOT")
    t.add_argument("--data", type=Path, required=True, help="folder of site folders")
    t.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pt, metrics.json, curves.png")
    t.add_argument("--preset", default="small", help="model preset: paper, small, tiny")
    t.add_argument("--size", type=int, default=None, help="override the preset's input size")
    t.add_argument("--epochs", type=int, default=4, help="epochs of each stage")
    t.add_argument("--epochs1", type=int, default=None, help="epochs of stage 1 (U-Net)")
    t.add_argument("--epochs2", type=int, default=None, help="epochs of stage 2 (classifier)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate of stage 1 (and of stage 2 unless --lr2)")
    t.add_argument("--lr2", type=float, default=None, help="learning rate of stage 2")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--split", choices=("patient", "slice"), default="patient", help="slice: random slice split (leaks)")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--no-denoise", action="store_true")
    t.add_argument("--no-skull-strip", action="store_true")
    t.add_argument("--no-centre", action="store_true")
    t.add_argument("--cache-dir", type=Path, default=None, help="default DATA_ROOT/.cache")
    t.add_argument("--device", default="auto")
    t.set_defaults(func=run_train)
    p = sub.add_parser("predict", help="score one DICOM study: markers, hematoma volume, overlay")
    p.add_argument("study_dir", type=Path)
    p.add_argument("--model", type=Path, required=True, help="checkpoint.pt")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--window", type=float, nargs=2, default=None, help="this scanner's HU window a b")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--site-norms",
        type=Path,
        default=None,
        help="a FedBN model: one site's stored normalisation layers (<cache>/federation/<site>/<run>)",
    )
    p.set_defaults(func=run_predict)
    return parser


def hemexp_main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(hemexp_main())
