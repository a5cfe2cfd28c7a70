"""``site.toml``: what a site says about itself (id, display name, HU window) and the run it
prepares its cache for (``[prepare]``).

Owned by the site's IT; distinct from a SuperNode's ``node_config`` (``client.federation.node``).
Its ``[policy]`` table is read by ``client.federation.policy``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Files of a site folder that hold the site's own settings and records, never data: ``site.toml``,
#: the apps it approved and the keys it trusts (``client.site_tools.app_trust``), its privacy ledger
#: (``client.federation.site_ledger``). The cache key leaves them out (``is_site_file``): each may
#: change between rounds, and none is an input of the cache.
SITE_FILES = frozenset({"site.toml", "approved-apps.toml", "trusted-entities.yaml", "privacy-ledger.json"})


def is_site_file(name: str) -> bool:
    """One of ``SITE_FILES``, or the temporary copy or lock file written beside one (``.NAME.tmp``, ``.NAME.lock``)."""
    if name in SITE_FILES:
        return True
    for suffix in (".tmp", ".lock"):
        if name.startswith(".") and name.endswith(suffix) and name[1 : -len(suffix)] in SITE_FILES:
            return True
    return False


@dataclass(frozen=True)
class SiteSettings:
    """``site.toml``: optional site id, display name and HU window; ``prepare``: the ``[prepare]``
    table as dotted run-config keys (``"model.image-size"``), what ``flwr-client prepare`` and
    ``start`` build the cache for unless the command line says otherwise."""

    site_id: str
    name: str
    window: tuple[float, float] | None = None
    prepare: Mapping[str, Any] = field(default_factory=dict)


def read_site_settings(site_dir: Path) -> SiteSettings:
    """Read ``site.toml`` if present; the folder name is the default site id."""
    path = site_dir / "site.toml"
    default = SiteSettings(site_id=site_dir.name, name=site_dir.name)
    if not path.is_file():
        return default
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from exc
    window = data.get("window")
    if window is not None:
        if not (isinstance(window, list) and len(window) == 2 and float(window[0]) < float(window[1])):
            raise ValueError(f"{path}: window must be [a, b] with a < b (HU), got {window!r}")
        window = (float(window[0]), float(window[1]))
    return SiteSettings(
        site_id=str(data.get("site_id", default.site_id)),
        name=str(data.get("name", default.name)),
        window=window,
        prepare=_prepare_table(path, data.get("prepare", {})),
    )


def _prepare_table(path: Path, table: Any, prefix: str = "") -> dict[str, Any]:
    """``[prepare]`` flattened to dotted keys: ``model.image-size = 32`` and ``"model.image-size" = 32``
    are the same key, as in the app's ``[tool.flwr.app.config]``. Which keys exist is the app's to say
    (``client.site_tools.run_setup``)."""
    if not isinstance(table, dict):
        raise ValueError(f"{path}: prepare must be a table ([prepare])")
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _prepare_table(path, value, f"{name}.")
        elif isinstance(value, (str, int, float, bool)):
            flat[name] = value
        else:
            raise ValueError(f"{path}: [prepare] {name} must be a string, number or boolean, got {value!r}")
    return flat
