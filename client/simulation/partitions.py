"""Simulation partitions: which prebuilt site cache each virtual node of a simulation trains on.

In deployment a site's data is its own folder. In a simulation the harness (``simulations/``) may
cut one dataset into virtual sites (label skew, quantity skew, scanner shift, leave-one-site-out),
writes each one as an ordinary site cache, and lists them in a manifest; the run-config key
``data.partitions`` names the manifest and node ``partition-id`` i trains on its i-th entry.
An entry may carry a ``fault`` (robustness experiments only: a site that misbehaves on purpose);
only the simulation's ClientApp (``client.simulation.app``) acts on it, the deployed one reads the
entry's site id and cache alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.federation.errors import SiteError
from client.simulation.faults import FaultError, parse_fault

MANIFEST_FORMAT = "hemexp-partitions/1"


@dataclass(frozen=True)
class Partition:
    """One virtual site: its id, the folder of its cache, and an optional injected fault."""

    site_id: str
    cache: str
    fault: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_fault(
            self.fault
        )  # a bad fault fails when the manifest is written or read (client.simulation.faults.FaultError)


def write_partitions(path: Path | str, partitions: list[Partition]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "partitions": [asdict(p) for p in partitions]}, indent=1))
    return path


def read_partitions(path: Path | str) -> list[Partition]:
    """The manifest's partitions; a wrong format is an error naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable partition manifest ({exc})") from None
    if doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: partition manifest format {doc.get('format')!r} is not {MANIFEST_FORMAT!r}")
    return [Partition(str(p["site_id"]), str(p["cache"]), dict(p.get("fault") or {})) for p in doc["partitions"]]


def manifest_partition(manifest: Path, partition_id: int) -> Partition:
    """The ``partition_id``-th entry of a simulation's partition manifest, for a virtual node.

    Errors are ``SiteError``s that name no path: their text reaches the server.
    """
    try:
        parts = read_partitions(manifest)
    except FaultError as exc:  # the fault dict's own problem (no path in it)
        raise SiteError(f"data.partitions has an invalid fault: {exc}") from None
    except ValueError:
        raise SiteError("data.partitions is not a readable partition manifest") from None
    if not 0 <= partition_id < len(parts):
        raise SiteError(f"partition {partition_id} has no entry: the manifest lists {len(parts)} partition(s)")
    return parts[partition_id]
