"""``hemexp``: the research and clinic tool (generate data, check, convert, train, predict).

Thin shell over the library; it lives on the research side because it reaches every package.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.cli import add_check_command, add_prepare_command, dispatch


def run_generate(args: argparse.Namespace) -> int:
    from simulations.synthetic import generate_dataset

    summary = generate_dataset(args.out, n_sites=args.sites, seed=args.seed, matrix=args.matrix,
                               studies_scale=args.scale, progress=True)
    print(summary.describe() if hasattr(summary, "describe") else summary)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from client.convert import convert_study
    from client.dicom import StudyError

    try:
        path = convert_study(args.study_dir, args.out)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p.path}: {p.reason}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
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
    g.set_defaults(func=run_generate)
    add_check_command(sub)
    add_prepare_command(sub)
    c = sub.add_parser("convert", help="write a DICOM study's HU volume as NIfTI (RAS+ affine)")
    c.add_argument("study_dir", type=Path)
    c.add_argument("out", type=Path)
    c.set_defaults(func=run_convert)
    return parser


def hemexp_main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(hemexp_main())
