"""Stage 2's training set at a site with ``gan.augment-ratio`` > 0 (docs/gan.md, design ii).

The site's GAN is trained once, at its first stage-2 round, on its training split's crops; its
generator is kept in the site's store (``SiteStore``, the site's own disk) for the later rounds.
Neither the generator nor a generated slice is ever put in a message: the reply holds the
classifier half only, as without augmentation.
"""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.common.logger import log
from torch.utils.data import Dataset

from client.data.dataset import SliceDataset
from client.federation.site_run import SiteRunConfig
from client.federation.store import SiteStore
from client.training.gan_augment import GanAugment, NoGanData, augmented_training_set
from common.gan import get_gan_preset

#: The store entry of the site's generator.
GENERATOR: str = "gan-generator"


def gan_augment(run: SiteRunConfig) -> GanAugment | None:
    """The run's augmentation, or None when ``gan.augment-ratio`` is 0."""
    opts = run.config.gan
    if opts.augment_ratio <= 0:
        return None
    return GanAugment(get_gan_preset(opts.preset), opts.steps, opts.augment_ratio)


def stage2_training_set(
    train: SliceDataset, run: SiteRunConfig, store: SiteStore, server_round: int, device: torch.device | str
) -> Dataset:
    """``train`` plus this round's generated slices (fresh samples every round, one generator per run).

    A site whose training split cannot train a conditional GAN (no crop with the marker annotated,
    or one class only) trains on its real slices: failing every stage-2 round would drop it from
    the federation's stage 2 altogether."""
    aug = gan_augment(run)
    if aug is None:
        return train
    try:
        ds, G, _ = augmented_training_set(train, aug, run.seed + server_round, device, store.load(GENERATOR))
    except NoGanData as exc:  # a site without both classes trains on its real slices, as without the option
        log(WARNING, "gan.augment-ratio: no generated slices at this site (%s)", exc)
        return train
    store.save(GENERATOR, G.state_dict())
    return ds
