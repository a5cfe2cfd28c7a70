"""``site.toml``: what a site says about itself (id, display name, HU window).

Owned by the site's IT; distinct from a SuperNode's ``node_config`` (``client.federation.node``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SiteSettings:
    """``site.toml``: optional site id, display name and HU window."""

    site_id: str
    name: str
    window: tuple[float, float] | None = None


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
    )
