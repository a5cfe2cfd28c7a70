"""docs/design.md is the contributor's map: every module, attribute and file it names must exist, so
the map cannot drift from the code unnoticed (issue 28)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "common", "simulations", "benchmarks")
#: A dotted name in backticks: `common.run_config`, `client.federation.site_run.SiteRunConfig`,
#: `common/run_config.py: STRATEGY_TRAITS` is a file path (below). Calls and wildcards are cut off.
NAMES = "|".join(PACKAGES)
DOTTED = re.compile(rf"`((?:{NAMES})(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
#: A repository path in backticks: `server/strategies/__init__.py`, `simulations/experiments/`.
PATH = re.compile(rf"`((?:{NAMES}|docs|tests)/[A-Za-z0-9_./<>-]*)")


def named(pattern: re.Pattern) -> list[str]:
    return sorted(set(pattern.findall((REPO / "docs" / "design.md").read_text())))


def resolves(dotted: str) -> bool:
    """The longest importable module prefix, then attributes for the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_the_map_names_many_modules():
    assert len(named(DOTTED)) > 40 and len(named(PATH)) > 20


@pytest.mark.parametrize("dotted", named(DOTTED))
def test_every_named_module_and_attribute_exists(dotted):
    assert resolves(dotted), f"docs/design.md names `{dotted}`, which does not import"


@pytest.mark.parametrize("path", named(PATH))
def test_every_named_path_exists(path):
    if "<" in path:  # a pattern (`simulations/report/<name>_section.py`): its folder must exist
        path = path[: path.index("<")].rsplit("/", 1)[0]
    assert (REPO / path.rstrip("/")).exists(), f"docs/design.md names `{path}`, which is not in the repository"
