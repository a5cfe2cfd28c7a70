"""The node's facts: which site this is, where its data and cache are, which device it trains on.

From ``context.node_config`` in deployment (``flower-supernode --node-config``); in simulation from
``partition-id`` and the run's ``data.*`` keys. Simulation-only code (``client.simulation``) is
imported only on the branch that reads a simulation's partition manifest, so a hospital's SuperNode
never loads it. A manifest entry's injected fault is not a fact of the node: only the simulation's
own ClientApp (``client.simulation.app``) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from client.data.cache import DEFAULT_CACHE
from client.federation.errors import SiteError
from client.ingest.layouts import list_site_folders
from client.ingest.site_settings import read_site_settings
from common.records import NODE_CACHE_DIR, NODE_DATA_PATH, NODE_DEVICE, NODE_PARTITION_ID, NODE_SITE_ID
from common.run_config import DataOptions


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
    #: Simulation only: the node's ``partition-id`` (which site folder, or which manifest entry, it is).
    partition_id: int | None = None

    @classmethod
    def from_context(cls, context: Context, data: DataOptions) -> SiteNode:
        node = context.node_config
        device = str(node.get(NODE_DEVICE, "auto"))
        if NODE_DATA_PATH in node:
            path = Path(str(node[NODE_DATA_PATH])).expanduser()
            site_id = str(node.get(NODE_SITE_ID) or read_site_settings(path).site_id)
            return cls(path, site_id, Path(str(node.get(NODE_CACHE_DIR) or DEFAULT_CACHE)).expanduser(), device)
        if NODE_PARTITION_ID not in node:
            raise SiteError(f"node config needs {NODE_DATA_PATH!r} (deployment) or {NODE_PARTITION_ID!r} (simulation)")
        partition_id = int(node[NODE_PARTITION_ID])
        if data.partitions:
            from client.simulation.partitions import manifest_partition  # simulation only: see the module docstring

            part = manifest_partition(Path(data.partitions), partition_id)
            cache_path = Path(part.cache)
            return cls(cache_path, part.site_id, cache_path.parent, device, cache_path, partition_id)
        root = Path(data.root).expanduser()
        path = partition_site(root, partition_id)
        cache = Path(data.cache_dir).expanduser() if data.cache_dir else root / ".cache"
        return cls(path, read_site_settings(path).site_id, cache, device, partition_id=partition_id)


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
