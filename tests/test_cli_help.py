"""What the tools' help and the docs say matches the code (issue 29): every default a help text states
is the parser's own, and the documented size of the built-in benchmark is what the generator makes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from client.inference.cli import build_clinic_parser
from client.site_tools.cli import build_parser as flwr_client_parser
from simulations.cli import build_parser as hemexp_parser
from simulations.synthetic.cohort import plan_site
from simulations.synthetic.profiles import default_profiles, scale_studies

REPO = Path(__file__).resolve().parents[1]
#: "default 96", "defaults to 96", "(default: /path)"; not another program's ("flower-supernode's default 9094").
STATED = re.compile(r"(?<!'s )\bdefaults?(?: to| is)?:? (?P<value>[^,;()]+?)(?=[,;)]|$)")
#: "1 = published reader agreement (default)".
NAMED = re.compile(r"(?P<value>[^\s,;()]+) = [^,;()]*\(default\)")
#: A count of patients as the docs write it: 1,052 (not "~1,050", an approximation).
PATIENTS = re.compile(r"(?<![~\d,])(\d{1,3}(?:,\d{3})+|\d+) patients\b")


def all_actions(parser: argparse.ArgumentParser, prog: str = ""):
    """``(command, action, help as printed)`` of every option of ``parser`` and its subcommands."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_actions(sub, f"{prog} {name}".strip())
        elif action.help and action.help is not argparse.SUPPRESS:
            yield prog, action, formatter._expand_help(action)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def wrong_defaults(parser: argparse.ArgumentParser) -> list[str]:
    """Options whose help states a default other than the parser's. A stated number must equal the
    default; a stated word or path must equal it where the parser has one, and is a description
    ("one per CPU core", "DATA_ROOT/.cache") where the default is resolved later (None)."""
    wrong = []
    for prog, action, text in all_actions(parser):
        stated = [m["value"].strip() for m in (*STATED.finditer(text), *NAMED.finditer(text))]
        for value in stated:
            number, default = _number(value), action.default
            if number is not None:
                ok = isinstance(default, int | float) and not isinstance(default, bool) and float(default) == number
            else:
                ok = default is None or value == str(default)
            if not ok:
                wrong.append(
                    f"{prog} {'/'.join(action.option_strings) or action.dest}: help {value!r}, default {default!r}"
                )
    return wrong


@pytest.mark.parametrize(
    "build", [hemexp_parser, build_clinic_parser, flwr_client_parser], ids=["hemexp", "clinic", "flwr-client"]
)
def test_every_stated_default_is_the_parsers(build):
    parser = build()
    assert wrong_defaults(parser) == []


def test_the_default_check_sees_a_stale_help_text():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    g = sub.add_parser("generate")
    g.add_argument("--scale", type=float, default=6.5, help="multiply every site's patients (default 6)")
    g.add_argument("--matrix", type=int, help="nominal matrix (sites vary around it; default 96)")
    g.add_argument("--noise", type=float, help="1 = published agreement (default), 0 = the truth")
    g.add_argument("--cache", type=Path, default=Path("/a"), help="cache root (default /b)")
    g.add_argument("--ok", type=int, default=3, help="three (default %(default)s)")
    g.add_argument("--described", help="workers (default: one per CPU core)")
    g.add_argument("--port", type=int, help="the node's port (flower-supernode's default 9094)")
    assert [w.split(":")[0] for w in wrong_defaults(parser)] == [
        "generate --scale",
        "generate --matrix",
        "generate --noise",
        "generate --cache",
    ]


def test_the_supernode_port_named_is_flowers():
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT

    (text,) = [t for _, a, t in all_actions(flwr_client_parser()) if "--clientappio-port" in a.option_strings]
    assert f"flower-supernode's default {SUPERNODE_UVICORN_DEFAULT_PORT}" in text


def generator_counts() -> dict[str, int]:
    """Sites, patients and studies of ``hemexp generate`` with its parser's defaults, from the plans
    alone (no image rendered; the matrix does not change them)."""
    args = hemexp_parser().parse_args(["generate", "--out", "unused"])
    profiles = [scale_studies(p, args.scale) for p in default_profiles(args.sites, args.seed, args.matrix)]
    studies = sum(len(plan_site(p, i, args.seed).studies) for i, p in enumerate(profiles, start=1))
    return {"sites": args.sites, "patients": sum(p.n_patients for p in profiles), "studies": studies}


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def test_readme_states_the_generators_benchmark():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(r"`hemexp generate`'s (\d+) sites, ([\d,]+) patients,\s+([\d,]+) studies", readme)
    assert found, "README.md no longer states the built-in benchmark's size"
    stated = dict(zip(("sites", "patients", "studies"), map(_int, found.groups())))
    assert stated == generator_counts()


def test_no_doc_states_a_stale_patient_count():
    """A patient count within 10 % of the benchmark's that is not it is a stale copy of it."""
    n = generator_counts()["patients"]
    files = [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "simulations" / "experiments").glob("*.toml")),
        *sorted((REPO / "benchmarks" / "results").glob("*.md")),
    ]
    stale = [
        f"{f.relative_to(REPO)}: {m[0]}"
        for f in files
        for m in PATIENTS.finditer(f.read_text(encoding="utf-8"))
        if abs(_int(m[1]) - n) <= 0.1 * n and _int(m[1]) != n
    ]
    assert stale == []
