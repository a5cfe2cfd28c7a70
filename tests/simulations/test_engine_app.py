"""The app ``flwr run`` builds its FAB from: a staged copy of the project's own files."""

from __future__ import annotations

import tomllib

import pytest

from client.federation.app_identity import code_digest
from simulations.engine import (
    APP_PACKAGES,
    DEPLOYED_CLIENTAPP,
    REPO,
    SIMULATION_CLIENTAPP,
    simulation_pyproject,
    stage_app,
)


def test_the_staged_app_holds_the_code_and_nothing_else(tmp_path) -> None:
    (tmp_path / "app" / "data").mkdir(parents=True)  # left from an earlier stage: replaced
    app = stage_app(REPO, tmp_path / "app")
    top = {p.name for p in app.iterdir()}
    assert top == {*APP_PACKAGES, "pyproject.toml", "README.md", ".gitignore"}
    assert code_digest(app) == code_digest(REPO)  # the sites' allowed-apps identity is unchanged
    assert not list(app.rglob("__pycache__"))
    repo_py = {
        p.relative_to(REPO) for pkg in APP_PACKAGES for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts
    }
    assert {p.relative_to(app) for p in app.rglob("*.py")} == repo_py


def test_the_staged_app_runs_the_simulation_clientapp_and_the_repository_the_deployed_one(tmp_path) -> None:
    """Only the staged copy's ``clientapp`` changes (to the app with fault injection); the rest of the
    project file, run-config defaults included, is the repository's."""
    app = stage_app(REPO, tmp_path / "app")
    repo_doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    staged_doc = tomllib.loads((app / "pyproject.toml").read_text())
    assert repo_doc["tool"]["flwr"]["app"]["components"]["clientapp"] == DEPLOYED_CLIENTAPP
    assert staged_doc["tool"]["flwr"]["app"]["components"]["clientapp"] == SIMULATION_CLIENTAPP
    staged_doc["tool"]["flwr"]["app"]["components"]["clientapp"] = DEPLOYED_CLIENTAPP
    assert staged_doc == repo_doc
    with pytest.raises(ValueError, match="expected one line"):
        simulation_pyproject('[tool.flwr.app.components]\nclientapp = "other:app"\n')
