"""The run config as a site reads it: ``common.run_config.RunConfig`` and what the site derives from it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from client.federation.errors import SiteError
from client.training.train import TrainConfig
from common.config import PreprocessConfig
from common.presets import ModelConfig
from common.records import TrainInstruction
from common.run_config import RunConfig, parse_run_config


@dataclass(frozen=True)
class SiteRunConfig:
    """The run-config values a site needs (the per-round ones come in the ConfigRecord)."""

    model: ModelConfig
    preprocess: PreprocessConfig
    batch_size: int
    eval_batch_size: int
    weight_decay: float
    optimizer: str
    augment: bool
    balanced: bool
    marker_sampling: str
    split: tuple[float, float, float]
    seed: int
    pos_weight: str  # "global" (the server's, from every site's counts) | "local" (this site's) | "none"
    #: ``privacy.secure-counts``: label counts leave the site only masked (docs/secure-aggregation.md).
    secure_counts: bool
    #: The whole run config, for what only one step reads (DP-SGD's plan: ``client.training.privacy``).
    config: RunConfig

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> SiteRunConfig:
        """Parsed and checked; a bad key is a SiteError naming it (run-config keys and values come
        from the server: nothing of the site's in their text)."""
        try:
            cfg = parse_run_config(rc)
        except (KeyError, ValueError) as exc:
            raise SiteError(str(exc.args[0]) if exc.args else type(exc).__name__) from None
        return cls.from_config(cfg)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> SiteRunConfig:
        model, pre = cfg.architecture()
        train = cfg.train
        return cls(
            model,
            pre,
            train.batch_size,
            train.eval_batch_size,
            train.weight_decay,
            train.optimizer,
            train.augment,
            train.balanced,
            train.marker_sampling,
            cfg.data.split,
            cfg.seed,
            train.pos_weight,
            cfg.privacy.secure_counts,
            cfg,
        )

    def site_seed(self, site: str, server_round: int) -> int:
        """This site's seed for a round: ``site_seed`` of the run's seed, the site id and the round."""
        return site_seed(self.seed, site, server_round)

    def train_config(self, order: TrainInstruction, site: str | None = None) -> TrainConfig:
        """The local training of one round: the server's per-round values, the run's others.
        The learning rate is constant within a round (a cosine would restart every round).
        ``site``: a federated site's id, whose batches, augmentation and dropout then draw from
        ``site_seed`` (its own stream, the same in every run); None (the in-process local and pooled
        baselines): the run's seed plus the round."""
        return TrainConfig(
            epochs=order.local_epochs,
            max_steps=order.local_steps,
            batch_size=self.config.train.batch(order.stage),
            lr=order.lr,
            weight_decay=self.weight_decay,
            optimizer=self.optimizer,
            schedule="constant",
            augment=self.augment,
            balanced=self.balanced,
            marker_sampling=self.marker_sampling,
            proximal_mu=order.proximal_mu,
            seed=self.seed + order.server_round if site is None else self.site_seed(site, order.server_round),
        )


def site_seed(seed: int, site: str, server_round: int) -> int:
    """A site's seed for one round, from the run's seed, the site id and the round only (31 bits).

    Derived from the site id (the manifest's or the node config's: stable across runs), never from
    Flower's node id (random per run) or the order in which sites start, so that two runs of the same
    seed train every site alike; and distinct per site, so that sites do not all draw the same
    batches, augmentations and dropout masks. A hash rather than a sum: seed + round collides
    across seeds and rounds (seed 0 round 2 = seed 1 round 1)."""
    digest = hashlib.sha256(f"hemexp-site-seed:{seed}:{site}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
