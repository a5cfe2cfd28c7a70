"""The clinic enters through its own commands (issue 29): ``hemexp predict`` and ``hemexp serve``, run
by the ``hemexp`` console script, import no ``simulations`` module (seen in a fresh interpreter); every
other command and ``hemexp --help`` still reach the whole tool."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import client.inference.cli as clinic_cli
from client.inference.cli import CLINIC_COMMANDS, hemexp_main
from simulations.cli import build_parser

REPO = Path(__file__).resolve().parents[3]

#: Runs the console script's function on clinic commands, then lists the ``simulations`` modules loaded.
FRESH = """
import importlib, json, sys
target, study, ckpt, out = sys.argv[1:]
module, name = target.split(":")
main = getattr(importlib.import_module(module), name)
codes = []
for argv in (["predict", "--help"], ["serve", "--help"]):
    try:
        main(argv)
    except SystemExit as exc:
        codes.append(exc.code)
run = ["--model", ckpt, "--device", "cpu"]
codes.append(main(["predict", study, "--out", out + "/one", *run]))
codes.append(main(["predict", "--batch", study + "/..", "--out", out + "/batch", "--key-dir", out + "/key", *run]))
codes.append(main(["serve", "--model", ckpt, "--dest", "not-a-destination"]))
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "simulations")
print(json.dumps({"codes": codes, "loaded": loaded}))
"""


def console_script() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]["hemexp"]


@pytest.mark.timeout(600)
def test_predict_and_serve_import_no_simulations_module(tmp_path, clinic_study, clinic_checkpoint):
    argv = [console_script(), str(clinic_study), str(clinic_checkpoint), str(tmp_path)]
    proc = subprocess.run([sys.executable, "-c", FRESH, *argv], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0, 0, 2], proc.stderr[-3000:]  # help, help, one study, a folder, a bad --dest
    assert (tmp_path / "one" / "prediction.json").is_file() and (tmp_path / "batch" / "summary.csv").is_file()
    assert result["loaded"] == []


def test_help_lists_every_command_of_the_whole_tool(capsys):
    with pytest.raises(SystemExit) as exc:
        hemexp_main(["--help"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    commands = next(a for a in build_parser()._actions if a.choices and "generate" in a.choices).choices
    assert set(CLINIC_COMMANDS) < set(commands)
    assert all(name in printed for name in commands), printed


def test_research_commands_go_to_the_whole_tool(capsys):
    with pytest.raises(SystemExit):
        hemexp_main(["generate", "--help"])
    assert "--scale" in capsys.readouterr().out


def test_a_clinic_only_install_offers_the_clinic_commands(monkeypatch, capsys):
    monkeypatch.setattr(clinic_cli, "whole_tool", lambda: None)
    with pytest.raises(SystemExit):
        hemexp_main(["--help"])
    printed = capsys.readouterr().out
    assert "predict" in printed and "serve" in printed and "generate" not in printed
    with pytest.raises(SystemExit) as exc:
        hemexp_main(["generate", "--out", "x"])
    assert exc.value.code == 2
