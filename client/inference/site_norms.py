"""A FedBN model's normalisation layers: they never left the sites, so its global checkpoint is incomplete.

Predicting with such a checkpoint needs one site's stored layers (``hemexp predict --site-norms``);
without them ``with_site_norms`` refuses instead of scoring with untrained normalisation.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from common.checkpoint import Checkpoint
from common.model import build_joint_model, norm_state_keys
from common.run_config import strategy_traits


def is_fedbn(ckpt: Checkpoint) -> bool:
    """A FedBN-like global model (``common.run_config.StrategyTraits.site_norms``): its normalisation
    layers are the sites', not in the checkpoint."""
    return strategy_traits(ckpt.meta.get("strategy")).site_norms


def load_site_norms(path: Path | str) -> dict[str, torch.Tensor]:
    """One site's FedBN normalisation layers: a file, or its run folder of the site store
    (``client.federation.store``: ``norm-unet.pt``, ``norm-classifier.pt``)."""
    path = Path(path)
    files = sorted(path.glob("norm-*.pt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"{path}: no site normalisation layers (norm-*.pt) there")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def with_site_norms(ckpt: Checkpoint, norms: dict[str, torch.Tensor] | None) -> Checkpoint:
    """The checkpoint a prediction can use: a FedBN one completed by one site's norm layers
    (ValueError without them, or when they miss a trained half's layers); others as they are."""
    if not is_fedbn(ckpt):
        if norms:
            raise ValueError("--site-norms is for a FedBN model; this checkpoint's run was not FedBN")
        return ckpt
    if not norms:
        raise ValueError(
            "this is a FedBN global model: its normalisation layers stayed at the sites and are not in it. "
            "Predict with one site's layers: hemexp predict ... --site-norms <cache dir>/federation/<site>/<run>"
        )
    keys = norm_state_keys(build_joint_model(ckpt.model_config))
    halves = ("unet", "classifier") if int(ckpt.meta.get("stage", 2)) == 2 else ("unet",)
    missing = sorted(k for k in keys if k.split(".")[0] in halves and k not in norms)
    unknown = sorted(set(norms) - set(ckpt.state_dict))
    if missing or unknown:
        raise ValueError(
            f"site norms do not fit this model: {len(missing)} layer tensor(s) missing"
            f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(unknown)} unknown"
        )
    return replace(ckpt, state_dict={**ckpt.state_dict, **{k: v for k, v in norms.items() if k in keys}})
