"""Which apps this site's SuperNode runs: the site's approvals, kept in its folder and enforced
outside the app, by the SuperNode process, before a run's ClientApp exists (docs/site-policy.md).

An app reaches a SuperNode as a FAB (Flower App Bundle: the app's files as the coordinator's
``flwr run`` or ``flwr build`` zipped them). Its sha256 names it at the SuperLink, and the SuperNode
hands exactly those bytes to the ClientApp; a digest approved here is therefore the code that runs,
whatever the app says about itself. Two ways to approve, both read by
``client.site_tools.approved_supernode`` whenever a new run arrives:

- ``approved-apps.toml``: the sha256 of FABs the site reviewed (``flwr-client trust approve``), for
  apps the coordinator runs from its own copy (``flwr run .``: Flower builds the same bytes from the
  same files, on the same machine).
- ``trusted-entities.yaml``: Flower's own ``--trusted-entities`` file (public key id -> Ed25519
  OpenSSH public key, ``flwr-client trust add-key``). A FAB that a trusted key signed through
  Flower Hub (``flwr app review``) is accepted, as ``flower-supernode`` itself would. Flower 1.42
  attaches signatures only to apps its SuperLink fetched from Flower Hub (``flwr run @publisher/app==version``).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: The FAB digests this site approved (TOML, in the site folder).
APPROVED_FILE = "approved-apps.toml"
#: Flower's trusted-entities file (YAML: public key id -> "ssh-ed25519 ..."), in the site folder.
ENTITIES_FILE = "trusted-entities.yaml"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ApprovedApp:
    """One approved FAB: its sha256, and what the FAB said it is when it was approved (labels only)."""

    sha256: str
    app: str = ""  # "<publisher>/<name>" from the FAB's pyproject.toml
    version: str = ""
    approved: str = ""  # when (UTC, ISO 8601)
    note: str = ""


def fab_sha256(fab: bytes) -> str:
    """The FAB's digest as Flower computes it (``hashlib.sha256(fab).hexdigest()``)."""
    return hashlib.sha256(fab).hexdigest()


def check_digest(text: str) -> str:
    """A sha256 as 64 lowercase hex digits (``sha256:`` prefix and case tolerated); else a ValueError."""
    digest = text.strip().lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"{text!r} is not a sha256 digest (64 hex digits)")
    return digest


def fab_identity(fab: bytes) -> tuple[str, str]:
    """(``publisher/name``, version) that the FAB's pyproject.toml states; ("", "") when unreadable."""
    from flwr.common.config import get_fab_config, get_metadata_from_config

    try:
        return get_metadata_from_config(get_fab_config(fab))
    except (ValueError, KeyError, TypeError):
        return "", ""


def build_fab(app_dir: Path) -> bytes:
    """The FAB that ``flwr run APP_DIR`` (and ``flwr build``) makes of ``app_dir``, by Flower's own builder."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


def read_approved(site_dir: Path) -> list[ApprovedApp]:
    """The site's approved FABs (none without the file); a malformed file is a ValueError naming it."""
    path = Path(site_dir) / APPROVED_FILE
    if not path.is_file():
        return []
    try:
        rows = tomllib.loads(path.read_text(encoding="utf-8")).get("app", [])
        apps = [ApprovedApp(**{k.replace("-", "_"): str(v) for k, v in row.items()}) for row in rows]
        for a in apps:
            check_digest(a.sha256)
    except (tomllib.TOMLDecodeError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path}: not a list of approved apps ({exc})") from None
    return apps


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string (same escapes)


def write_approved(site_dir: Path, apps: Iterable[ApprovedApp]) -> Path:
    """Write ``approved-apps.toml`` (atomically: the SuperNode may read it at any time)."""
    path = Path(site_dir) / APPROVED_FILE
    lines = ["# Apps this site's SuperNode runs, by FAB sha256: written by `flwr-client trust` (docs/site-policy.md)."]
    for a in apps:
        lines += ["", "[[app]]"] + [f"{k} = {_toml_string(v)}" for k, v in asdict(a).items() if v]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def approve(site_dir: Path, digest: str, app: str = "", version: str = "", note: str = "") -> ApprovedApp:
    """Add a FAB digest to the site's approved apps (once: approving it again keeps the first entry)."""
    digest = check_digest(digest)
    apps = read_approved(site_dir)
    for a in apps:
        if a.sha256 == digest:
            return a
    entry = ApprovedApp(digest, app, version, datetime.now(UTC).isoformat(timespec="seconds"), note)
    write_approved(site_dir, [*apps, entry])
    return entry


def revoke(site_dir: Path, digest: str) -> bool:
    """Remove a digest from the approved apps (runs of it that already started are not stopped)."""
    digest = check_digest(digest)
    apps = read_approved(site_dir)
    kept = [a for a in apps if a.sha256 != digest]
    if len(kept) == len(apps):
        return False
    write_approved(site_dir, kept)
    return True


def read_trusted_entities(site_dir: Path) -> dict[str, str]:
    """Flower's trusted entities of the site (public key id -> OpenSSH Ed25519 public key)."""
    import yaml

    path = Path(site_dir) / ENTITIES_FILE
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must map public key ids to public keys")
    return {str(k): str(v) for k, v in data.items()}


def check_ed25519(public_key: str) -> str:
    """The key as one line, if it is an OpenSSH Ed25519 public key (what Flower accepts); else a ValueError."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    line = " ".join(public_key.split())
    try:
        key = load_ssh_public_key(line.encode())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("Flower verifies app signatures with Ed25519 keys only ('ssh-ed25519 ...')")
    return line


def add_trusted_entity(site_dir: Path, key_id: str, public_key: str) -> Path:
    """Add (or replace) one trusted entity in the site's ``trusted-entities.yaml``, in Flower's format."""
    import yaml

    if not key_id.strip() or any(c.isspace() for c in key_id):
        raise ValueError(f"public key id {key_id!r}: give Flower Hub's id of the key (fpk_...), without spaces")
    entities = {**read_trusted_entities(site_dir), key_id: check_ed25519(public_key)}
    path = Path(site_dir) / ENTITIES_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(entities, default_flow_style=False, width=4096), encoding="utf-8")
    tmp.replace(path)
    return path


def has_approvals(site_dir: Path) -> bool:
    """Whether the site approved any FAB or trusts any signer (else its SuperNode would run nothing)."""
    return bool(read_approved(site_dir) or read_trusted_entities(site_dir))


def verdict(fab: Any, approved: Iterable[str], trusted_entities: Mapping[str, str] | None) -> str | None:
    """None when this site runs ``fab`` (a ``flwr.supercore.fab.Fab``); else why not, safe to send
    (the FAB's digest, no path). Approved: its content's sha256 (recomputed here, not the hash the
    SuperLink claims) is on the list, or a trusted entity signed it (Flower's ``_verify_fab``)."""
    digest = fab_sha256(fab.content)
    if digest in set(approved):
        return None
    if trusted_entities and fab.verifications.get("valid_license", ""):
        from flwr.supernode.start_client_internal import _verify_fab

        if _verify_fab(fab, dict(trusted_entities)):
            return None
    signed = "signed by none of its trusted entities" if trusted_entities else "not signed by an entity it trusts"
    return f"this site has not approved this app (FAB sha256 {digest}: not on its approved list, {signed})"
