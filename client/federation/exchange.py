"""The model as it crosses the wire at a site: the global half received, the frozen U-Net of
stage 2 (sent once, then read from the site's disk), FedBN's local layers, and the SITE record of
every reply (the site id only)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, Message

from client.federation.errors import SiteError
from client.federation.node import SiteNode
from client.federation.site_run import SiteRunConfig
from client.federation.store import SiteStore
from common.model import JointModel, build_joint_model, half_state_dict, load_half_state_dict, norm_state_keys
from common.records import ARRAYS, FROZEN_UNET, HALF_OF_STAGE, SITE_ID, arrays_digest, record_to_state


def load_half(
    model: JointModel, half: str, received: Mapping[str, torch.Tensor], store: SiteStore, local_keys: set[str]
) -> None:
    """Load the server's arrays for one half; with FedBN the norm layers come from the site's disk
    (or stay at their initial values before the site's first round)."""
    if not local_keys:
        load_half_state_dict(model, half, received)
        return
    state = half_state_dict(model, half)
    state.update(store.load(f"norm-{half}") or {})
    state.update(received)
    load_half_state_dict(model, half, state)


def frozen_unet(msg: Message, digest: str, store: SiteStore) -> dict[str, torch.Tensor]:
    """Stage 2 runs on the global U-Net: sent once per site, then read back from the site's disk."""
    return sent_once(msg, FROZEN_UNET, digest, store, "unet", "global U-Net")


def sent_once(
    msg: Message, record: str, digest: str, store: SiteStore, prefix: str, what: str
) -> dict[str, torch.Tensor]:
    """A state the server sends a site once (``record`` of the message) and names by its content
    ``digest`` afterwards: checked against the digest and kept in the store as ``<prefix>-<digest>``."""
    name = f"{prefix}-{digest}"
    if record in msg.content:
        arrays = msg.content[record]
        if arrays_digest(arrays) != digest:
            raise SiteError(f"the {what} received does not match its digest")
        state = record_to_state(arrays)
        store.save(name, state)
        return state
    state = store.load(name)
    if state is None:
        raise SiteError(f"the {what} {digest[:12]} is not stored at this site; the server sends it again next round")
    return state


def receive_model(
    msg: Message, run: SiteRunConfig, store: SiteStore, stage: int, local_norm: bool, unet_digest: str
) -> tuple[JointModel, set[str]]:
    """The global model as this site holds it: the stage's half from the message, the frozen U-Net
    in stage 2, the site's own normalisation layers under FedBN (whose keys are returned)."""
    model = build_joint_model(run.model, seed=run.seed)
    local_keys = norm_state_keys(model) if local_norm else set()
    if stage == 2:
        load_half(model, "unet", frozen_unet(msg, unet_digest, store), store, local_keys)
    load_half(model, HALF_OF_STAGE[stage], record_to_state(msg.content[ARRAYS]), store, local_keys)
    return model, local_keys


def site_record(site: SiteNode) -> ConfigRecord:
    """The SITE record of a reply: who replied, by site id only."""
    return ConfigRecord({SITE_ID: site.site_id})
