"""The node's facts: which site this is, where its data and cache are, which device it trains on.

From ``context.node_config`` in deployment (``flower-supernode --node-config``); in simulation from
``partition-id`` and the run's ``data.*`` keys. Simulation-only code (``client.simulation``) is
imported only on the branch that reads a simulation's partition manifest, so a hospital's SuperNode
never loads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context

from client.data.cache import DEFAULT_CACHE
from client.federation.errors import SiteError
from client.ingest.layouts import list_site_folders
from client.ingest.site_settings import read_site_settings
from common.records import NODE_CACHE_DIR, NODE_DATA_PATH, NODE_DEVICE, NODE_PARTITION_ID, NODE_SITE_ID
from common.run_config import DataOptions

if TYPE_CHECKING:
    from client.simulation.partitions import Partition


@dataclass(frozen=True)
class SiteNode:
    """Facts about this site's node: from ``node_config`` in deployment, ``partition-id`` in simulation.
    (The site's own ``site.toml`` is ``client.ingest.site_settings.SiteSettings``.)"""

    data_path: Path
    site_id: str
    cache_dir: Path
    device: str = "auto"
    #: Simulation with ``data.partitions``: the partition's prebuilt cache (``data_path`` unused).
    cache_path: Path | None = None
    #: Simulation robustness experiments only: how this virtual site misbehaves (``client.simulation.partitions``).
    fault: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_context(cls, context: Context, data: DataOptions) -> SiteNode:
        node = context.node_config
        if NODE_DATA_PATH in node:
            path = Path(str(node[NODE_DATA_PATH])).expanduser()
            site_id = str(node.get(NODE_SITE_ID) or read_site_settings(path).site_id)
            cache = Path(str(node.get(NODE_CACHE_DIR) or DEFAULT_CACHE)).expanduser()
        elif NODE_PARTITION_ID in node and data.partitions:
            part = manifest_partition(Path(data.partitions), int(node[NODE_PARTITION_ID]))
            cache_path = Path(part.cache)
            return cls(
                cache_path, part.site_id, cache_path.parent, str(node.get(NODE_DEVICE, "auto")), cache_path, part.fault
            )
        elif NODE_PARTITION_ID in node:
            root = Path(data.root).expanduser()
            path = partition_site(root, int(node[NODE_PARTITION_ID]))
            site_id = read_site_settings(path).site_id
            cache = Path(data.cache_dir).expanduser() if data.cache_dir else root / ".cache"
        else:
            raise SiteError(f"node config needs {NODE_DATA_PATH!r} (deployment) or {NODE_PARTITION_ID!r} (simulation)")
        return cls(path, site_id, cache, str(node.get(NODE_DEVICE, "auto")))


def manifest_partition(manifest: Path, partition_id: int) -> Partition:
    """The ``partition_id``-th entry of a simulation's partition manifest (errors name no path)."""
    from client.simulation.faults import FaultError  # simulation only: see the module docstring
    from client.simulation.partitions import read_partitions

    try:
        parts = read_partitions(manifest)
    except FaultError as exc:  # the fault dict's own problem (no path in it)
        raise SiteError(f"data.partitions has an invalid fault: {exc}") from None
    except ValueError:
        raise SiteError("data.partitions is not a readable partition manifest") from None
    if not 0 <= partition_id < len(parts):
        raise SiteError(f"partition {partition_id} has no entry: the manifest lists {len(parts)} partition(s)")
    return parts[partition_id]


def partition_site(data_root: Path, partition_id: int) -> Path:
    """The ``partition_id``-th site folder of ``data_root`` (``client.ingest.layouts.list_site_folders``).

    Errors name no path: their text reaches the server.
    """
    if not data_root.is_dir():
        raise SiteError("data.root does not exist on this machine")
    sites = list_site_folders(data_root)
    if not 0 <= partition_id < len(sites):
        raise SiteError(f"partition {partition_id} has no site: data.root holds {len(sites)} site folder(s)")
    return sites[partition_id]
