"""The run a site prepares for: the app's run config (pyproject defaults, then the site's own
``site.toml`` ``[prepare]``, then the coordinator's overrides given on the command line) and the
preprocessing it implies, so that ``prepare`` and ``start`` build the very cache round 1 opens (the
cache is keyed by its preprocessing, ``client.data.cache``) and ``policy check`` tests the run that
will come."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.common.config import get_fused_config_from_dir, parse_config_args

from client.federation.app_identity import APP_ROOT
from client.ingest.site_settings import read_site_settings
from common.config import PreprocessConfig
from common.run_config import model_from_run_config


def app_run_config(
    overrides: str | None = None, app_dir: Path = APP_ROOT, site_dir: Path | None = None
) -> dict[str, Any]:
    """The run config as ``flwr run APP -c OVERRIDES`` fuses it (``overrides``: "key=value ..." or a
    .toml file); with ``site_dir``, that site's ``[prepare]`` keys come before the overrides (which win)."""
    if not (Path(app_dir) / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir}: no pyproject.toml (pass --app-dir, the app's folder)")
    parsed = parse_config_args([overrides]) if overrides else {}
    site = site_run_config(site_dir, get_fused_config_from_dir(Path(app_dir), {})) if site_dir else {}
    return dict(get_fused_config_from_dir(Path(app_dir), {**site, **parsed}))


def site_run_config(site_dir: Path, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``site.toml`` ``[prepare]``, every key checked against the app's run config ``defaults``: an
    unknown key or a value of another type is a ValueError naming the file and the key (a typo must
    not quietly prepare a cache no run opens)."""
    path = Path(site_dir) / "site.toml"
    values = {}
    for key, value in read_site_settings(Path(site_dir)).prepare.items():
        if key not in defaults:
            raise ValueError(f"{path}: [prepare] has no run-config key {key!r} (the keys of `--run-config`)")
        values[key] = _typed_like(path, key, value, defaults[key])
    return values


def _typed_like(path: Path, key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the key's default (an integer is a float's value too)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ValueError(f"{path}: [prepare] {key} must be {type(default).__name__}, got {value!r}")
    return value


def run_preprocess(
    overrides: str | None = None,
    app_dir: Path = APP_ROOT,
    size: int | None = None,
    denoise: bool | None = None,
    strip_skull: bool | None = None,
    centre: bool | None = None,
    site_dir: Path | None = None,
) -> PreprocessConfig:
    """The preprocessing of the run (``site_dir``'s ``[prepare]`` under ``overrides``), with each
    explicitly given step replacing the run's."""
    cfg = model_from_run_config(app_run_config(overrides, app_dir, site_dir))[1]
    given = {"size": size, "denoise": denoise, "strip_skull": strip_skull, "centre": centre}
    return replace(cfg, **{k: v for k, v in given.items() if v is not None})
