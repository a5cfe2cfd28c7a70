"""Aggregation strategies by name: Flower's own, plus FedBN and the imbalance-aware head.

``build_strategy(cfg, local_keys=..., head_keys=...)`` returns a fresh strategy; the server builds one
per stage, because server-side optimiser state (FedAdam's moments) is per array and the two stages
exchange different arrays. Strategies aggregate and return; they never write files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from common.run_config import StrategyOptions, strategy_traits
from server.strategies.aggregate import aggregate_metrics
from server.strategies.fedbn import FedBN
from server.strategies.imbalance import PositiveWeightedHead, positive_weighted_rows, with_imbalance_head

#: name -> (Flower strategy class, the keyword arguments it takes beyond the common ones); the names are
#: ``common.run_config.STRATEGY_NAMES``, the values ``strategy.name`` may take.
STRATEGIES: dict[str, tuple[type, Callable[[StrategyOptions], dict[str, Any]]]] = {
    "fedavg": (FedAvg, lambda cfg: {}),
    "fedprox": (FedProx, lambda cfg: {"proximal_mu": cfg.proximal_mu}),
    "fedadam": (FedAdam, lambda cfg: {"eta": cfg.server_lr, "tau": cfg.tau}),
    "fedyogi": (FedYogi, lambda cfg: {"eta": cfg.server_lr, "tau": cfg.tau}),
    "fedbn": (FedBN, lambda cfg: {}),
    "fedmedian": (FedMedian, lambda cfg: {}),
    "fedtrimmedavg": (FedTrimmedAvg, lambda cfg: {"beta": cfg.trim_beta}),
    "krum": (Krum, lambda cfg: {"num_malicious_nodes": cfg.num_malicious}),
}


def build_strategy(
    cfg: StrategyOptions, *, local_keys: Iterable[str] = (), head_keys: tuple[str, str] = ("", "")
) -> Strategy:
    """A new strategy named by ``cfg.name``; ``local_keys``: FedBN's normalisation keys;
    ``head_keys``: (weight, bias) of the final classifier layer, used when ``cfg.imbalance_head``."""
    if cfg.name not in STRATEGIES:
        raise KeyError(f"unknown strategy {cfg.name!r}; valid strategies: {sorted(STRATEGIES)}")
    cls, extra = STRATEGIES[cfg.name]
    kw: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
        **extra(cfg),
    )
    if strategy_traits(cfg.name).site_norms:
        kw["local_keys"] = local_keys
    if cfg.imbalance_head:
        return with_imbalance_head(cls)(head_keys=head_keys, **kw)
    return cls(**kw)


__all__ = [
    "STRATEGIES",
    "build_strategy",
    "FedBN",
    "PositiveWeightedHead",
    "with_imbalance_head",
    "positive_weighted_rows",
    "aggregate_metrics",
]
