"""``hemexp predict`` and ``hemexp serve``: the clinic's commands, and the ``hemexp`` entry point.

A clinic scores CT studies with ``client.inference`` alone, so its commands are built and run here and
``hemexp predict`` / ``hemexp serve`` never import the research harness (``simulations``). The research
commands (generate, train, clip-norms, ...) live in ``simulations.cli``, whose parser adds these clinic
commands too (one implementation); ``hemexp_main`` reaches that whole tool through the ``hemexp.cli``
entry point (pyproject.toml) only for a command that is not a clinic one or for the tool's help, because
``client`` never imports ``simulations`` (docs/design.md §3). Where the research tool is not installed
(a clinic-only install), ``hemexp`` offers the clinic commands alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from client.site_tools.cli import dispatch

if TYPE_CHECKING:
    from client.inference.predict import ScoringModel

#: The commands ``hemexp_main`` runs itself, without the research tool.
CLINIC_COMMANDS = ("predict", "serve")
#: Entry-point group and name of the whole ``hemexp`` tool (research and clinic commands; pyproject.toml).
TOOL_GROUP, TOOL_NAME = "hemexp.cli", "research"


def run_predict(args: argparse.Namespace) -> int:
    from client.inference.backends import options_for
    from client.inference.predict import load_scoring_model, run_prediction
    from client.ingest.dicom import StudyError
    from common.runtime import resolve_device, use_torch_threads

    if (args.study_dir is None) == (args.batch is None):
        print("error: give either STUDY_DIR or --batch FOLDER", file=sys.stderr)
        return 2
    window = tuple(args.window) if args.window else None
    try:
        use_torch_threads(args.threads)
        device = resolve_device(args.device)
        options = options_for(device, args.backend, tuple(args.int8), args.calibration)
        model = load_scoring_model(args.model, str(device), options, args.site_norms)
        if args.batch is not None:
            return _run_batch(args, model, window)
        result = run_prediction(args.study_dir, model, args.out, model.device, window, dicom=args.dicom)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p.path}: {p.reason}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    calls = result["present"]
    markers = ", ".join(f"{k} {v:.2f} ({'yes' if calls[k] else 'no'})" for k, v in result["markers"].items())
    extra = " and the DICOM SEG + SR" if args.dicom else ""
    print(f"{markers}; hematoma {result['volume_ml']:.1f} ml; wrote {args.out}/prediction.json, overlay.png{extra}")
    return 0


def _run_batch(args: argparse.Namespace, model: ScoringModel, window: tuple[float, float] | None) -> int:
    from client.inference.batch import run_batch

    path, rows = run_batch(args.batch, model, args.out, window, dicom=args.dicom, key_dir=args.key_dir)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{len(rows)} studies: {ok} scored, {len(rows) - ok} not scored; wrote {path}")
    return 0 if ok else 1


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from client.inference.predict import load_scoring_model
    from client.inference.serve import Destination, NodeConfig, SpoolInUse, serve_forever
    from common.runtime import resolve_device, use_torch_threads

    # Only the node's own lines at INFO: pynetdicom's and highdicom's name UIDs.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("hemexp").setLevel(logging.INFO)
    if args.audit_log:
        handler = logging.FileHandler(args.audit_log)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("hemexp.audit").addHandler(handler)
    try:
        use_torch_threads(args.threads)
        config = NodeConfig(
            destination=Destination.parse(args.dest),
            ae_title=args.ae_title,
            host=args.host,
            port=args.port,
            settle_s=args.settle,
            incomplete_wait_s=args.incomplete_wait,
            allowed_calling=tuple(args.allow_ae or ()),
            spool_dir=args.spool,
            keep_dir=args.keep,
            key_dir=args.key_dir,
            retry_wait_s=args.retry_wait,
            resend_s=args.resend_every,
            device=str(resolve_device(args.device)),
        )
        model = load_scoring_model(args.model, config.device, site_norms=args.site_norms)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        serve_forever(config, model)
    except SpoolInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score one DICOM study (or --batch a folder): markers, volume, overlay")
    p.add_argument("study_dir", type=Path, nargs="?", help="one study folder")
    p.add_argument("--batch", type=Path, default=None, help="score every study folder below FOLDER; summary.csv")
    p.add_argument("--model", type=Path, required=True, help="checkpoint.pt")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dicom", action="store_true", help="also write the DICOM SEG (seg.dcm) and SR (sr.dcm)")
    p.add_argument("--window", type=float, nargs=2, default=None, help="this scanner's HU window a b")
    p.add_argument("--key-dir", type=Path, default=None, help="the site's pseudonym key folder (default: site cache)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--threads", type=int, default=0, help="torch and ONNX Runtime threads (default %(default)s, the usable cores)"
    )
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto", help="auto: ONNX Runtime on a CPU")
    p.add_argument("--int8", nargs="+", choices=("segment", "classify"), default=[], help="parts run as int8 (onnx)")
    p.add_argument("--calibration", type=Path, default=None, help="site cache folder that calibrates --int8")
    p.add_argument(
        "--site-norms",
        type=Path,
        default=None,
        help="a FedBN model: one site's stored normalisation layers (<cache>/federation/<site>/<run>)",
    )
    p.set_defaults(func=run_predict)


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("serve", help="DICOM node: receive CT series (C-STORE), send back SEG + SR (docs/clinic.md)")
    v.add_argument("--model", type=Path, required=True, help="checkpoint.pt")
    v.add_argument("--dest", required=True, help="where results go: AE@HOST:PORT (the PACS)")
    v.add_argument("--ae-title", default="HEMEXP", help="this node's AE title")
    v.add_argument("--host", default="0.0.0.0", help="address to listen on")
    v.add_argument("--port", type=int, default=11112)
    v.add_argument(
        "--settle", type=float, default=10.0, help="seconds without a new instance before a series is checked (10)"
    )
    v.add_argument(
        "--incomplete-wait",
        type=float,
        default=300.0,
        help="seconds without a new instance after which a series that still looks incomplete is refused (300)",
    )
    v.add_argument("--allow-ae", action="append", help="accept only these calling AE titles (repeat)")
    v.add_argument(
        "--spool",
        type=Path,
        default=None,
        help="persistent folder of the series until their results are sent (default: ~/.cache/hemexp/serve-spool)",
    )
    v.add_argument("--keep", type=Path, default=None, help="keep received series and results here (default: delete)")
    v.add_argument("--retry-wait", type=float, default=10.0, help="seconds between the 3 attempts to send (10)")
    v.add_argument(
        "--resend-every", type=float, default=60.0, help="seconds between rounds for results not yet sent (60)"
    )
    v.add_argument("--audit-log", type=Path, default=None, help="append the per-study audit lines to this file")
    v.add_argument("--key-dir", type=Path, default=None, help="the site's pseudonym key folder (default: site cache)")
    v.add_argument("--device", default="auto")
    v.add_argument(
        "--threads", type=int, default=0, help="torch and ONNX Runtime threads (default %(default)s, the usable cores)"
    )
    v.add_argument("--site-norms", type=Path, default=None, help="a FedBN model: this site's normalisation layers")
    v.set_defaults(func=run_serve)


def add_clinic_commands(sub: argparse._SubParsersAction) -> None:
    """``predict`` and ``serve``, for this module's parser and for the research tool's (``simulations.cli``)."""
    add_predict_command(sub)
    add_serve_command(sub)


def build_clinic_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hemexp", description="hemexp: hematoma-expansion markers on head CT")
    add_clinic_commands(parser.add_subparsers())
    return parser


def whole_tool() -> Callable[[list[str]], int] | None:
    """The installed ``hemexp`` tool with every command (``simulations.cli``), or None on a clinic-only install."""
    for ep in entry_points(group=TOOL_GROUP, name=TOOL_NAME):
        return ep.load()
    return None


def hemexp_main(argv: list[str] | None = None) -> int:
    """The ``hemexp`` console script: a clinic command runs here; anything else (a research command,
    ``hemexp --help``) goes to the whole tool, which lists every command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    tool = None if argv[:1] and argv[0] in CLINIC_COMMANDS else whole_tool()
    if tool is not None:
        return tool(argv)
    return dispatch(build_clinic_parser(), argv)


if __name__ == "__main__":
    sys.exit(hemexp_main())
