"""Which app this process runs, as a site's ``allowed-apps`` names it (docs/site-policy.md).

A ClientApp sees no FAB hash in its ``Context``; what it has is its own code. Three identities:

- ``code:<sha256>``: the digest of the Python files under ``client/`` and ``common/`` (what the
  ClientApp executes), paths and bytes, in path order. The same commit gives the same digest whether
  it runs from a FAB Flower installed, an editable checkout or a simulation; the strong one.
- ``fab:<prefix>``: when Flower installed the app from a FAB, the install folder is
  ``<publisher>.<name>.<version>.<first 8 hex of the FAB hash>``; only that prefix is known here.
- ``version:<version>+<commit>``: pyproject's version and the checkout's git commit, when there is one.
"""

from __future__ import annotations

import functools
import hashlib
import re
import subprocess
import tomllib
from pathlib import Path

#: The repository (or the FAB's install folder) this module was loaded from.
APP_ROOT = Path(__file__).resolve().parents[2]
#: The packages a ClientApp executes.
CODE_PACKAGES = ("client", "common")


def code_digest(root: Path = APP_ROOT) -> str:
    """sha256 of the ``CODE_PACKAGES`` Python files of ``root`` (relative path and bytes, path order)."""
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def fab_prefix(root: Path = APP_ROOT) -> str:
    """The FAB hash prefix in the install folder's name (``FLWR_HOME/apps/...``), or ""."""
    match = re.fullmatch(r".+\.([0-9a-f]{8})", root.name)
    return match.group(1) if match and root.parent.name == "apps" else ""


def version_commit(root: Path = APP_ROOT) -> str:
    """``<version>+<commit>`` (or just the version when ``root`` is not a git checkout)."""
    try:
        version = str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


@functools.cache
def app_identities(root: Path = APP_ROOT) -> tuple[str, ...]:
    """Every identity of the app under ``root`` (once per process: the code does not change under it)."""
    out = [f"code:{code_digest(root)}", f"version:{version_commit(root)}"]
    if prefix := fab_prefix(root):
        out.append(f"fab:{prefix}")
    return tuple(out)
