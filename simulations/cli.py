"""``hemexp``: the whole tool, research commands (generate, check, prepare, convert, rsna-site, train,
clip-norms) and the clinic's (predict, serve).

The clinic's commands are built and run by ``client.inference.cli``, which is also the ``hemexp`` console
script: it runs a clinic command without importing this package and hands every other command (and
``hemexp --help``) to ``hemexp_main`` here through the ``hemexp.cli`` entry point (pyproject.toml).
This parser lives on the research side because it reaches every package.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from client.inference.cli import add_clinic_commands
from client.site_tools.cli import add_check_command, add_prepare_command, dispatch
from simulations.synthetic.generate import DEFAULT_MATRIX
from simulations.synthetic.profiles import DEFAULT_STUDIES_SCALE, SiteProfile


def run_generate(args: argparse.Namespace) -> int:
    from simulations.synthetic import generate_dataset

    overrides = {
        k: v
        for k, v in (("reader_noise", args.reader_noise), ("mimic_scale", args.mimic_scale), ("readers", args.readers))
        if v is not None
    }
    summary = generate_dataset(
        args.out,
        n_sites=args.sites,
        seed=args.seed,
        matrix=args.matrix,
        studies_scale=args.scale,
        progress=True,
        overwrite=args.overwrite,
        workers=args.workers,
        profile_overrides=overrides,
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
    from client.data.expansion import ExpansionRule
    from client.training.gan_augment import GanAugment
    from client.training.train import TrainConfig
    from common.config import PreprocessConfig
    from common.gan import get_gan_preset
    from common.presets import get_preset
    from common.runtime import resolve_device
    from simulations.baselines import FitConfig, run_pooled
    from simulations.sites import prepare_caches

    overrides = {**({"image_size": args.size} if args.size else {}), **({"norm": args.norm} if args.norm else {})}
    if args.expansion:
        overrides["predict_expansion"] = True
    model_cfg = get_preset(args.preset, **overrides)
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
        train=TrainConfig(
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            augment=not args.no_augment,
            max_steps=args.max_steps,
        ),
        lr_stage2=args.lr2,
        split_by=args.split,
        gan=GanAugment(get_gan_preset(args.gan_preset), args.gan_steps, args.gan_ratio) if args.gan_ratio else None,
    )
    rule = ExpansionRule(args.expansion_ratio, args.expansion_ml)
    metrics = run_pooled(caches, model_cfg, pre, fit, args.out, resolve_device(args.device), expansion_rule=rule)
    t = metrics["test"]
    print(
        f"test: dice {t['dice']:.3f}, macro-AUC (study) {t['macro_auc_study']:.3f}, volume MAE {t['volume_mae_ml']:.2f} ml"
    )
    print(f"wrote {args.out}/checkpoint.pt, metrics.json, curves.png")
    return 0


def run_clip_norms(args: argparse.Namespace) -> int:
    """Per-patient gradient norms of a checkpoint on public data, per stage: the C to set (docs/privacy.md)."""
    import numpy as np

    from client.data.dataset import pooled
    from client.training.clip_tuning import dataset_norms, run_config_line, summarize
    from client.training.train import TrainConfig
    from common.checkpoint import build_from_checkpoint, load_checkpoint
    from common.runtime import resolve_device
    from simulations.baselines import FitConfig, site_splits, stage_pos_weight
    from simulations.sites import prepare_caches

    ckpt = load_checkpoint(args.model)
    device = resolve_device(args.device)
    model = build_from_checkpoint(ckpt, device)
    caches, _ = prepare_caches(args.data, ckpt.preprocess, args.cache_dir, progress=False)
    splits = site_splits(caches, FitConfig(train=TrainConfig(seed=args.seed)))
    chosen = ("train", "val", "test") if args.split == "all" else (args.split,)
    datasets = [s[name] for s in splits.values() for name in chosen if len(s[name])]
    pos_weight = stage_pos_weight(model, pooled(datasets)).to(device)
    summaries = {}
    for stage in args.stages:
        norms = np.concatenate([dataset_norms(model, ds, stage, pos_weight, device) for ds in datasets])
        summaries[stage] = summarize(norms, stage)
        print(summaries[stage].describe())
    print(f"run config: {run_config_line(summaries)}")
    return 0


def _profile_default(name: str) -> object:
    """A ``SiteProfile`` field's default: what the generator uses when the flag is not given."""
    return next(f.default for f in fields(SiteProfile) if f.name == name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hemexp", description="hemexp: hematoma-expansion markers on head CT")
    sub = parser.add_subparsers()
    g = sub.add_parser("generate", help="write the synthetic multi-site CT dataset (DICOM + NIfTI + labels)")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--sites", type=int, default=12, help="number of hospitals (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="every draw's seed (default %(default)s)")
    g.add_argument(
        "--matrix",
        type=int,
        default=DEFAULT_MATRIX,
        help="nominal in-plane matrix (sites vary around it; default %(default)s)",
    )
    g.add_argument(
        "--scale",
        type=float,
        default=DEFAULT_STUDIES_SCALE,
        help="multiply every site's number of patients (default %(default)s)",
    )
    g.add_argument("--workers", type=int, help="sites written in parallel (default: one per CPU core)")
    g.add_argument(
        "--reader-noise",
        type=float,
        default=_profile_default("reader_noise"),
        help="1 = published reader agreement, 0 = labels are the truth (default %(default)s)",
    )
    g.add_argument("--mimic-scale", type=float, help="multiply every site's mimic rates (0 = no mimics)")
    g.add_argument("--readers", type=int, choices=(1, 2), help="2 = two readers per study, adjudicated")
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
    t.add_argument(
        "--norm", choices=("batch", "group"), default=None, help="override the preset's norm (group: for a DP run)"
    )
    t.add_argument("--epochs", type=int, default=4, help="epochs of each stage")
    t.add_argument("--epochs1", type=int, default=None, help="epochs of stage 1 (U-Net)")
    t.add_argument("--epochs2", type=int, default=None, help="epochs of stage 2 (classifier)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate of stage 1 (and of stage 2 unless --lr2)")
    t.add_argument("--lr2", type=float, default=None, help="learning rate of stage 2")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--split", choices=("patient", "slice"), default="patient", help="slice: random slice split (leaks)")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--max-steps", type=int, default=0, help="at most this many steps per epoch (0: whole epochs)")
    t.add_argument("--gan-ratio", type=float, default=0.0, help="stage 2: add RATIO x the slices of SNGAN ones")
    t.add_argument("--gan-preset", default="tiny", help="GAN preset: tiny, small, paper (common/gan.py)")
    t.add_argument("--gan-steps", type=int, default=200, help="generator updates of the augmentation GAN")
    t.add_argument("--expansion", action="store_true", help="train the expansion head too (docs/gan.md)")
    t.add_argument("--expansion-ratio", type=float, default=1.3, help="expansion: follow-up >= RATIO x baseline")
    t.add_argument("--expansion-ml", type=float, default=None, help="expansion also: growth >= ML ml")
    t.add_argument("--no-denoise", action="store_true")
    t.add_argument("--no-skull-strip", action="store_true")
    t.add_argument("--no-centre", action="store_true")
    t.add_argument("--cache-dir", type=Path, default=None, help="default DATA_ROOT/.cache")
    t.add_argument("--device", default="auto")
    t.set_defaults(func=run_train)
    n = sub.add_parser(
        "clip-norms",
        help="per-patient gradient norms of a checkpoint on public data: DP-SGD's clipping bound per stage",
    )
    n.add_argument("--model", type=Path, required=True, help="the run's train.init-checkpoint")
    n.add_argument(
        "--data", type=Path, required=True, help="folder of public or synthetic site folders (no hospital's)"
    )
    n.add_argument(
        "--split",
        choices=("all", "train", "val", "test"),
        default="test",
        help="patients of each site's split (hemexp train's, by --seed); test: those a checkpoint trained there never saw",
    )
    n.add_argument("--seed", type=int, default=0, help="the split's seed (hemexp train --seed)")
    n.add_argument("--stages", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    n.add_argument("--cache-dir", type=Path, default=None, help="default DATA_ROOT/.cache")
    n.add_argument("--device", default="auto")
    n.set_defaults(func=run_clip_norms)
    add_clinic_commands(sub)
    return parser


def hemexp_main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(hemexp_main())
