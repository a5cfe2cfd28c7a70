"""``flwr-client``: the site IT tool (check the data, build the cache, approve apps, start the
SuperNode, show what the site holds and its policy).

Thin shell: argument parsing and printing only; the work is in ``client.site_tools`` (check, run_setup,
site_status, supernode), ``client.federation.policy`` and ``client.data.cache``.
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


def usage_error(exc: Exception) -> int:
    """Print why the command cannot go on (the exception's message, no traceback); exit status 2."""
    print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
    return 2


def prepare_config(args: argparse.Namespace, site_dir: Path) -> PreprocessConfig:
    """The run's preprocessing: the app's defaults, ``site_dir``'s ``site.toml`` ``[prepare]`` over
    them, ``--run-config`` over that, the explicit flags over all (the command line always wins)."""
    from client.site_tools.run_setup import run_preprocess

    return run_preprocess(
        args.run_config,
        args.app_dir,
        size=args.size,
        denoise=False if args.no_denoise else None,
        strip_skull=False if args.no_skull_strip else None,
        centre=False if args.no_centre else None,
        site_dir=site_dir,
    )


def add_run_config_options(p: argparse.ArgumentParser) -> None:
    """``--run-config`` and ``--app-dir``: the run the site prepares for or tests against its policy."""
    from client.federation.app_identity import APP_ROOT

    p.add_argument(
        "--run-config",
        metavar="OVERRIDES",
        help='the coordinator\'s run-config overrides, as for `flwr run -c` ("key=value ..." or a .toml file)',
    )
    p.add_argument("--app-dir", type=Path, default=APP_ROOT, help=f"the app's folder (default {APP_ROOT})")


def run_prepare(args: argparse.Namespace) -> int:
    from client.data.cache import build_site_cache

    try:
        cfg = prepare_config(args, args.site_dir)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        return usage_error(exc)
    cache, problems = build_site_cache(args.site_dir, args.cache_dir, cfg, progress=True)
    for p in problems:
        print(f"problem: {p.path}: {p.reason}", file=sys.stderr)
    state = "reused" if cache.hit else "built"
    print(
        f"cache {state}: {cache.path} ({cache.index['n_studies']} studies, {cache.n_slices} slices, {cfg.size}x{cfg.size})"
    )
    return 0 if cache.n_slices else 1


def add_prepare_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="preprocess a site folder once into its local cache, for the run's preset and preprocessing "
        "(site.toml [prepare], then --run-config and the flags below)",
    )
    p.add_argument("site_dir", type=Path)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"cache root (default {DEFAULT_CACHE})")
    add_run_config_options(p)
    p.add_argument("--size", type=int, help="model input size in pixels (default: the run's)")
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
        any_app=args.any_app,
    )
    if args.no_prepare:
        return start(opts, prepare=None)
    try:
        cfg = prepare_config(args, args.data)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        return usage_error(exc)
    return start(opts, prepare=cfg)


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
    add_run_config_options(p)
    p.add_argument("--size", "--prepare-size", type=int, help="input size of the cache built before starting")
    for flag in ("--no-denoise", "--no-skull-strip", "--no-centre"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-retries", type=int, help="flower-supernode: reconnection attempts (default: unlimited)")
    p.add_argument("--max-wait-time", type=float, help="flower-supernode: seconds to keep reconnecting")
    p.add_argument(
        "--clientappio-port",
        type=int,
        help="local port of the SuperNode's Runtime API (flower-supernode's default 9094)",
    )
    p.add_argument(
        "--any-app",
        action="store_true",
        help="run any app the coordinator sends (demos, tests); otherwise only the apps `trust` approved",
    )
    p.set_defaults(func=run_start)


def run_trust(args: argparse.Namespace) -> int:
    from client.site_tools import app_trust

    try:
        if args.action == "approve":
            if sum(x is not None for x in (args.fab, args.app_dir, args.sha256)) != 1:
                return usage_error(ValueError("give exactly one of --fab, --app-dir, --sha256"))
            fab = args.fab.read_bytes() if args.fab else app_trust.build_fab(args.app_dir) if args.app_dir else None
            digest = app_trust.fab_sha256(fab) if fab is not None else args.sha256
            name, version = app_trust.fab_identity(fab) if fab is not None else ("", "")
            entry = app_trust.approve(args.site_dir, digest, name, version, args.note or "")
            print(f"approved: {entry.sha256} {entry.app} {entry.version}".rstrip())
            print(f"the SuperNode of {args.site_dir} runs this app from its next run on (flwr-client start)")
        elif args.action == "revoke":
            if not args.sha256:
                return usage_error(ValueError("revoke needs --sha256"))
            found = app_trust.revoke(args.site_dir, args.sha256)
            print(f"revoked: {args.sha256}" if found else f"not approved: {args.sha256}")
            return 0 if found else 1
        elif args.action == "add-key":
            if not (args.key_id and args.public_key):
                return usage_error(ValueError("add-key needs KEY_ID and PUBLIC_KEY"))
            key_file = Path(args.public_key)
            text = key_file.read_text() if key_file.is_file() else args.public_key
            path = app_trust.add_trusted_entity(args.site_dir, args.key_id, text)
            print(f"trusted: {args.key_id} in {path} (used by flower-supernode from the next `flwr-client start`)")
        else:
            approved, entities = app_trust.read_approved(args.site_dir), app_trust.read_trusted_entities(args.site_dir)
            print(f"approved apps ({app_trust.APPROVED_FILE}): {len(approved) or 'none'}")
            for a in approved:
                print(f"  {a.sha256}  {a.app} {a.version}  approved {a.approved}  {a.note}".rstrip())
            print(f"trusted signers ({app_trust.ENTITIES_FILE}, Flower Hub signatures): {len(entities) or 'none'}")
            for key_id, key in entities.items():
                print(f"  {key_id}: {key}")
    except (OSError, ValueError) as exc:
        return usage_error(exc)
    return 0


def add_trust_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trust",
        help="approve the apps this site's SuperNode runs, or trust their signers (docs/site-policy.md)",
    )
    p.add_argument("action", choices=("approve", "revoke", "add-key", "list"))
    p.add_argument("site_dir", type=Path)
    p.add_argument("key_id", nargs="?", help="add-key: Flower Hub's id of the signer's key (fpk_...)")
    p.add_argument("public_key", nargs="?", help="add-key: its 'ssh-ed25519 ...' public key, or a file holding it")
    p.add_argument("--fab", type=Path, help="approve: the FAB file the coordinator published (flwr build)")
    p.add_argument("--app-dir", type=Path, help="approve: the app's folder, built into a FAB as `flwr run` builds it")
    p.add_argument("--sha256", help="approve, revoke: the FAB's sha256 (64 hex digits)")
    p.add_argument("--note", help="approve: a note kept with the approval (who reviewed it, the release)")
    p.set_defaults(func=run_trust)


def run_status(args: argparse.Namespace) -> int:
    from client.federation.app_identity import app_identities
    from client.federation.policy import read_policy
    from client.site_tools.site_status import format_status

    try:
        policy = read_policy(args.site_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_status(args.site_dir, args.cache_dir, policy, app_identities()))
    return 0


def add_status_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="what this site holds: caches, runs taken part in, privacy budget, policy")
    p.add_argument("site_dir", type=Path)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"cache root (default {DEFAULT_CACHE})")
    p.set_defaults(func=run_status)


def run_policy(args: argparse.Namespace) -> int:
    from client.federation.app_identity import app_identities
    from client.federation.policy import read_policy
    from client.site_tools.run_setup import app_run_config
    from client.site_tools.site_status import format_policy, policy_verdict, site_spent
    from common.run_config import parse_run_config

    try:
        policy = read_policy(args.site_dir)
        if args.action == "show":
            print(format_policy(policy, app_identities()))
            return 0
        cfg = parse_run_config(app_run_config(args.run_config, args.app_dir))
        spent = site_spent(args.site_dir, policy)[0]
    except (FileNotFoundError, KeyError, ValueError) as exc:
        return usage_error(exc)
    broken = policy_verdict(policy, cfg, app_identities(args.app_dir.resolve()), spent)
    for v in broken:
        print(f"refused: {v}")
    print("this site refuses the run" if broken else "this site takes part in the run")
    return 1 if broken else 0


def add_policy_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="show the site's policy, or check a run config against it (docs/site-policy.md)")
    p.add_argument("action", choices=("show", "check"))
    p.add_argument("site_dir", type=Path)
    add_run_config_options(p)
    p.set_defaults(func=run_policy)


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flwr-client",
        description="hemexp site tool: check data, build the cache, approve apps, join the federation",
    )
    sub = parser.add_subparsers()
    add_check_command(sub)
    add_prepare_command(sub)
    add_start_command(sub)
    add_trust_command(sub)
    add_status_command(sub)
    add_policy_command(sub)
    return parser


def flwr_client_main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(flwr_client_main())
