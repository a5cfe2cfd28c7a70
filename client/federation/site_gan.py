"""Stage 2's training set at a site with ``gan.augment-ratio`` > 0, and the site's side of a GAN round.

Design (ii) of docs/gan.md (``rounds.gan`` = 0): the site's GAN is trained once, at its first
stage-2 round, on its training split's crops; its generator is kept in the site's store
(``SiteStore``, the site's own disk) for the later rounds and is never put in a message.

Design (i) (``rounds.gan`` > 0): in each GAN round the site trains the global G and D it received on
the same crops and replies with their state (``gan_round``); in stage 2 it samples from the final
global generator, sent once and kept in its store (``global_generator``).

In both, a generated slice exists in this process only: the stage-2 reply holds the classifier half,
as without augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from logging import WARNING

import numpy as np
import torch
from flwr.app import Message, MetricRecord
from flwr.common.logger import log
from torch import Tensor
from torch.utils.data import Dataset

from client.data.dataset import SliceDataset, parts_of
from client.federation.errors import SiteError
from client.federation.exchange import sent_once
from client.federation.site_run import SiteRunConfig
from client.federation.store import SiteStore
from client.training.gan import GanTrainResult, train_gan
from client.training.gan_augment import GanAugment, NoGanData, augmented_training_set, crop_tensors, training_crops
from common.gan import build_gan, gan_state_dict, get_gan_preset, load_gan_state_dict
from common.records import (
    GAN_D_LOSS,
    GAN_G_LOSS,
    GAN_G_PREFIX,
    GAN_GENERATOR,
    NUM_EXAMPLES,
    STEPS,
    TRAIN_SECONDS,
    GanInstruction,
    TrainInstruction,
)

#: The store entry of the site's generator.
GENERATOR: str = "gan-generator"


def gan_augment(run: SiteRunConfig) -> GanAugment | None:
    """The run's augmentation, or None when ``gan.augment-ratio`` is 0."""
    opts = run.config.gan
    if opts.augment_ratio <= 0:
        return None
    return GanAugment(get_gan_preset(opts.preset), opts.steps, opts.augment_ratio)


def stage2_training_set(
    train: SliceDataset,
    run: SiteRunConfig,
    store: SiteStore,
    server_round: int,
    device: torch.device | str,
    generator: Mapping[str, Tensor] | None = None,
    site: str | None = None,
) -> Dataset:
    """``train`` plus this round's generated slices (fresh samples every round, one generator per run).

    ``generator``: the global one of a GAN stage (design (i)); None: the site's own (design (ii)),
    trained at its first stage-2 round and kept in its store. A site whose training split cannot
    train its own conditional GAN (no crop with the marker annotated, or one class only) trains on
    its real slices: failing every stage-2 round would drop it from the federation's stage 2
    altogether. The global generator needs carriers only (crops of either class): a site without
    positive crops still gets generated positives. ``site``: the site id, whose round seed
    (``SiteRunConfig.site_seed``) draws the samples; None: the run's seed plus the round."""
    aug = gan_augment(run)
    if aug is None:
        return train
    state = generator if generator is not None else store.load(GENERATOR)
    try:
        ds, G, _ = augmented_training_set(train, aug, round_seed(run, site, server_round), device, state)
    except NoGanData as exc:  # a site without both classes trains on its real slices, as without the option
        log(WARNING, "gan.augment-ratio: no generated slices at this site (%s)", exc)
        return train
    if generator is None:
        store.save(GENERATOR, G.state_dict())
    return ds


def global_generator(
    msg: Message, order: TrainInstruction, run: SiteRunConfig, store: SiteStore
) -> dict[str, Tensor] | None:
    """Stage 2 after a GAN stage: the final global generator's state (``Generator`` keys), sent once
    with a stage-2 train message and kept in the store under its digest; None without a GAN stage."""
    if not run.config.rounds.gan:
        return None
    if not order.gan_digest:
        raise SiteError("rounds.gan > 0, but the stage-2 message names no global generator (gan-digest)")
    state = sent_once(msg, GAN_GENERATOR, order.gan_digest, store, GENERATOR, "global generator")
    return {k[len(GAN_G_PREFIX) :]: v for k, v in state.items() if k.startswith(GAN_G_PREFIX)}


def gan_round(
    train: SliceDataset,
    run: SiteRunConfig,
    order: GanInstruction,
    received: Mapping[str, Tensor],
    device: torch.device | str,
    site: str | None = None,
) -> tuple[dict[str, Tensor], int, GanTrainResult | None]:
    """One GAN round here: the global G and D (``received``, ``common.gan.gan_state_dict`` keys)
    trained for ``order.local_steps`` generator updates on the training split's crops (design
    (ii)'s crops). Returns their state (the same keys), the number of crops (FedAvg's weight) and
    the losses. A site whose crops cannot train a conditional GAN (``NoGanData``) returns the
    received state, 0 crops and no result: the server leaves a reply of 0 examples out of the mean.
    Batches and noise draw from the site's round seed (``round_seed``)."""
    cfg = get_gan_preset(run.config.gan.preset)
    G, D = build_gan(cfg, run.seed)
    load_gan_state_dict(G, D, received)
    try:
        images, labels = crop_tensors(training_crops(parts_of(train), cfg))
    except NoGanData as exc:
        log(WARNING, "rounds.gan: this site sits out GAN round %d (%s)", order.server_round, exc)
        return dict(received), 0, None
    G, D = G.to(device), D.to(device)
    result = train_gan(G, D, images, labels, cfg, order.local_steps, round_seed(run, site, order.server_round))
    return gan_state_dict(G.cpu(), D.cpu()), int(images.shape[0]), result


def round_seed(run: SiteRunConfig, site: str | None, server_round: int) -> int:
    """A site's seed for a round (``SiteRunConfig.site_seed``); without a site id the run's seed plus the round."""
    return run.seed + server_round if site is None else run.site_seed(site, server_round)


def gan_round_metrics(crops: int, result: GanTrainResult | None) -> MetricRecord:
    """A GAN reply's scalars: crops trained on (0: sat out), steps, seconds and the mean losses."""
    trained = result is not None and result.steps > 0
    return MetricRecord(
        {
            NUM_EXAMPLES: crops,
            STEPS: result.steps if trained else 0,
            TRAIN_SECONDS: float(result.seconds) if trained else 0.0,
            GAN_D_LOSS: float(np.mean(result.d_losses)) if trained else math.nan,
            GAN_G_LOSS: float(np.mean(result.g_losses)) if trained else math.nan,
        }
    )
