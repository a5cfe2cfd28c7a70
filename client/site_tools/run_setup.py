"""The run a site prepares for: the app's run config (pyproject defaults plus the coordinator's
overrides) and the preprocessing it implies, so that ``prepare`` and ``start`` build the very cache
round 1 opens (the cache is keyed by its preprocessing, ``client.data.cache``) and ``policy check``
tests the run that will come."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.common.config import get_fused_config_from_dir, parse_config_args

from client.federation.app_identity import APP_ROOT
from common.config import PreprocessConfig
from common.run_config import model_from_run_config


def app_run_config(overrides: str | None = None, app_dir: Path = APP_ROOT) -> dict[str, Any]:
    """The run config as ``flwr run APP -c OVERRIDES`` fuses it (``overrides``: "key=value ..." or a .toml file)."""
    if not (Path(app_dir) / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir}: no pyproject.toml (pass --app-dir, the app's folder)")
    parsed = parse_config_args([overrides]) if overrides else {}
    return dict(get_fused_config_from_dir(Path(app_dir), parsed))


def run_preprocess(
    overrides: str | None = None,
    app_dir: Path = APP_ROOT,
    size: int | None = None,
    denoise: bool | None = None,
    strip_skull: bool | None = None,
    centre: bool | None = None,
) -> PreprocessConfig:
    """The preprocessing of the run, with each explicitly given step replacing the run's."""
    cfg = model_from_run_config(app_run_config(overrides, app_dir))[1]
    given = {"size": size, "denoise": denoise, "strip_skull": strip_skull, "centre": centre}
    return replace(cfg, **{k: v for k, v in given.items() if v is not None})
