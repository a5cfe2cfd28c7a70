"""``flwr-client``: the site IT tool (check the data, build the cache, start the SuperNode).

Thin shell: argument parsing and printing only; the work is in ``client.site_tools.check`` and ``client.data.cache``.
``add_check_command`` / ``add_prepare_command`` are reused by the ``hemexp`` research tool so that
both commands share one implementation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.data.cache import DEFAULT_CACHE
from common.config import PreprocessConfig


def run_check(args: argparse.Namespace) -> int:
    from client.site_tools.check import check_site, format_table, to_json

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
    from client.data.cache import build_site_cache

    cfg = PreprocessConfig(
        size=args.size, denoise=not args.no_denoise, strip_skull=not args.no_skull_strip, centre=not args.no_centre
    )
    cache, problems = build_site_cache(args.site_dir, args.cache_dir, cfg, progress=True)
    for p in problems:
        print(f"problem: {p.path}: {p.reason}", file=sys.stderr)
    state = "reused" if cache.hit else "built"
    print(
        f"cache {state}: {cache.path} ({cache.index['n_studies']} studies, {cache.n_slices} slices, {cfg.size}x{cfg.size})"
    )
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


def run_start(args: argparse.Namespace) -> int:
    from client.site_tools.supernode import StartOptions, start

    opts = StartOptions(
        superlink=args.superlink,
        data=args.data,
        cache_dir=args.cache_dir,
        site_id=args.site_id,
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
        insecure=args.insecure,
        device=args.device,
        max_retries=args.max_retries,
        max_wait_time=args.max_wait_time,
        clientappio_port=args.clientappio_port,
    )
    return start(opts, prepare=not args.no_prepare, prepare_size=args.prepare_size)


def add_start_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("start", help="join the federation: run flower-supernode for this site (docs/deploy.md)")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink")
    p.add_argument("--data", required=True, type=Path, metavar="SITE_DIR", help="the site folder")
    p.add_argument("--site-id", help="site id sent with every reply (default: site.toml's, else the folder name)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"cache root (default {DEFAULT_CACHE})")
    p.add_argument("--root-certificates", type=Path, metavar="CA", help="the federation's CA certificate (TLS)")
    p.add_argument(
        "--auth-key",
        type=Path,
        metavar="KEY",
        help="this site's ECDSA private key (OpenSSH); the coordinator registers its .pub",
    )
    p.add_argument("--insecure", action="store_true", help="no TLS: only for a SuperLink on loopback (demos, tests)")
    p.add_argument("--device", help="torch device for the ClientApp (default: auto)")
    p.add_argument("--no-prepare", action="store_true", help="do not build the site cache before starting")
    p.add_argument(
        "--prepare-size",
        type=int,
        default=None,
        help="input size of the cache built before starting (default: the preprocessing default)",
    )
    p.add_argument("--max-retries", type=int, help="flower-supernode: reconnection attempts (default: unlimited)")
    p.add_argument("--max-wait-time", type=float, help="flower-supernode: seconds to keep reconnecting")
    p.add_argument("--clientappio-port", type=int, help="local port of the SuperNode's Runtime API (default 9094)")
    p.set_defaults(func=run_start)


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def flwr_client_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flwr-client", description="hemexp site tool: check data, build the cache, join the federation"
    )
    sub = parser.add_subparsers()
    add_check_command(sub)
    add_prepare_command(sub)
    add_start_command(sub)
    return dispatch(parser, argv)


if __name__ == "__main__":
    sys.exit(flwr_client_main())
