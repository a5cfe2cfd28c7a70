"""``flwr-client``: the site IT tool (check the data, build the cache, start the SuperNode).

Thin shell: argument parsing and printing only; the work is in ``client.check`` and ``client.cache``.
``add_check_command`` / ``add_prepare_command`` are reused by the ``hemexp`` research tool so that
both commands share one implementation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import PreprocessConfig

DEFAULT_CACHE = Path.home() / ".cache" / "hemexp"


def run_check(args: argparse.Namespace) -> int:
    from client.check import check_site, format_table, to_json

    try:
        report = check_site(args.site_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(to_json(report) if args.json else format_table(report))
    return 0 if report.usable else 1


def add_check_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="report which studies of a site folder are usable, and why not")
    p.add_argument("site_dir", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run_check)


def run_prepare(args: argparse.Namespace) -> int:
    from client.cache import build_site_cache

    cfg = PreprocessConfig(size=args.size, denoise=not args.no_denoise, strip_skull=not args.no_skull_strip,
                           centre=not args.no_centre)
    cache, problems = build_site_cache(args.site_dir, args.cache_dir, cfg, progress=True)
    for p in problems:
        print(f"problem: {p.path}: {p.reason}", file=sys.stderr)
    state = "reused" if cache.hit else "built"
    print(f"cache {state}: {cache.path} ({cache.index['n_studies']} studies, {cache.n_slices} slices, {cfg.size}x{cfg.size})")
    return 0 if cache.n_slices else 1


def add_prepare_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="preprocess a site folder once into its local cache")
    p.add_argument("site_dir", type=Path)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"cache root (default {DEFAULT_CACHE})")
    p.add_argument("--size", type=int, default=PreprocessConfig.size, help="model input size in pixels")
    p.add_argument("--no-denoise", action="store_true")
    p.add_argument("--no-skull-strip", action="store_true")
    p.add_argument("--no-centre", action="store_true")
    p.set_defaults(func=run_prepare)


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def flwr_client_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flwr-client", description="hemexp site tool: check data, build the cache, join the federation")
    sub = parser.add_subparsers()
    add_check_command(sub)
    add_prepare_command(sub)
    return dispatch(parser, argv)


if __name__ == "__main__":
    sys.exit(flwr_client_main())
