"""What a site keeps on its own disk between rounds of one run (deployment starts a fresh process
for every message, so nothing survives in memory): FedBN's normalisation layers and the frozen
global U-Net of stage 2, under ``<cache dir>/federation/<site id>/<run name>/``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from client.federation.node import SiteNode


@dataclass(frozen=True)
class SiteStore:
    """Tensors a site keeps on its own disk between rounds of one run (never sent anywhere)."""

    root: Path

    @classmethod
    def for_run(cls, site: SiteNode, run_name: str) -> SiteStore:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", run_name) or "run"
        return cls(site.cache_dir / "federation" / site.site_id / name)

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.root / f"{name}.pt"
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def save(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.pt.tmp"
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, tmp)
        tmp.replace(self.root / f"{name}.pt")
