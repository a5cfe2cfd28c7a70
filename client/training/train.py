"""Local two-stage training: the one loop behind site training, pooled and local-only baselines.

Stage 1 trains the U-Net on the hematoma masks (Dice + BCE); stage 2 trains the marker
classifier with the U-Net frozen (eval mode, no gradients) on weighted BCE (paper §4, formula 2).
The positive-class weights are passed in, so a federated run can use the global counts.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from client.data.dataset import UNET_MASK, UNET_VECTOR, make_loader
from common.config import LABELS, check_known_keys
from common.losses import segmentation_loss, weighted_bce
from common.model import JointModel, classifier_image, freeze_unet, frozen_unet_outputs, to_input, unfreeze_unet
from common.roi import placement_mask, roi_jitter
from common.run_config import MARKER_SAMPLING


class PrivateTraining(Protocol):
    """What the loop needs of a differentially private optimiser (``client.training.privacy.DPSGD``
    implements it): the loop never names the privacy module, so privacy can build on the loop."""

    def attach(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        anchor: list[Tensor] | None,
        proximal_mu: float,
    ) -> tuple[torch.optim.Optimizer, DataLoader]: ...

    def micro_batches(self, batch: dict[str, Tensor]) -> Iterable[dict[str, Tensor]]:
        """The batch in the parts whose gradients one noisy step accumulates (``privacy.physical-batch``)."""
        ...

    def empty_step(self, optimizer: torch.optim.Optimizer) -> None: ...

    def detach(self) -> None: ...


STAGES = (1, 2)
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")
#: Stage-2 sampling: ``natural`` draws every slice alike (the paper); ``balanced`` oversamples
#: marker-positive slices to about half the draws. Independent of the loss's pos-weight.


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one local training call (parsed once from run config or CLI).

    ``proximal_mu`` > 0 adds FedProx's proximal term mu/2 ||w - w_global||^2 to the loss.
    ``max_steps`` > 0 caps the optimizer steps per call (0: whole epochs).
    ``balanced`` oversamples hematoma slices in stage 1; ``marker_sampling`` is stage 2's
    sampling (``MARKER_SAMPLING``), so that sampling and loss weighting correct imbalance once.
    """

    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    augment: bool = True
    hflip: bool = True
    rotate_degrees: float = 10.0
    intensity_jitter: float = 0.1
    balanced: bool = True
    marker_sampling: str = "natural"
    proximal_mu: float = 0.0
    max_steps: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {list(SCHEDULES)}")
        if self.marker_sampling not in MARKER_SAMPLING:
            raise ValueError(f"unknown marker sampling {self.marker_sampling!r}; valid: {list(MARKER_SAMPLING)}")

    def oversample(self, stage: int) -> bool:
        """Whether a stage's loader oversamples its positives (``make_loader(balanced=...)``)."""
        return self.balanced if stage == 1 else self.marker_sampling == "balanced"

    def loader(self, ds: Dataset, stage: int) -> DataLoader:
        """A stage's shuffled training loader: this config's batch size and seed, ``oversample(stage)``."""
        return make_loader(
            ds, self.batch_size, shuffle=True, seed=self.seed, balanced=self.oversample(stage), stage=stage
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        return cls(**check_known_keys(cls, d, "training"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """What a training call reports: mean loss, samples seen (not batches), steps, throughput."""

    loss: float
    num_examples: int
    steps: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.num_examples / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class Acceleration:
    """Speed options of the loop that leave what is learnt the same (up to rounding), picked per device.

    bf16: forward passes under bf16 autocast (losses in fp32); the wavelet pooling is a plain
        convolution, so it is safe there. channels_last: the model and its inputs in NHWC memory
        (faster convolutions on tensor cores). compile: ``torch.compile`` the trained half in place.
    ``workers``: loader processes (with pinned memory) feeding a GPU; 0 reads in the training process.
    Augmentation always runs on the training device (``augment_batch``), from the same CPU draws.
    """

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    workers: int = 0

    @classmethod
    def for_device(cls, device: torch.device | str, compile: bool = False) -> Acceleration:
        """All off on the CPU (the CPU path is the plain loop); on a GPU bf16 where supported,
        channels_last and up to 4 loader workers."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls()
        workers = min(4, max((os.cpu_count() or 1) - 1, 0))
        return cls(bf16=torch.cuda.is_bf16_supported(), channels_last=True, compile=compile, workers=workers)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)


def fed_loader(loader: DataLoader, workers: int) -> DataLoader:
    """``loader`` read by ``workers`` processes (into pinned memory for a GPU), the same batches in the same order
    (the sampler, and its generator, stays in this process); ``loader`` itself when ``workers`` is 0."""
    if workers <= 0 or loader.num_workers > 0:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=loader.sampler,
        drop_last=loader.drop_last,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def output_columns(model: JointModel) -> list[int]:
    """Columns of the cache's LABELS array that the model's logits predict, in output order."""
    return [LABELS.index(name) for name in model.output_names]


def augment_batch(image: Tensor, mask: Tensor, cfg: TrainConfig, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Left-right flips, small rotations and intensity jitter on a float batch [B, 1, H, W].

    The random draws come from ``g`` on the CPU and the arithmetic runs where ``image`` is, so a GPU
    run augments on the GPU with the same draws as a CPU run.

    No up-down flip: the fluid level's denser layer is dependent (posterior), a flip would put
    it anteriorly and turn a positive into an anatomically impossible image.
    """
    b = image.shape[0]
    if cfg.hflip:
        flip = (torch.rand(b, generator=g) < 0.5).to(image.device)
        image = torch.where(flip[:, None, None, None], image.flip(-1), image)
        mask = torch.where(flip[:, None, None, None], mask.flip(-1), mask)
    if cfg.rotate_degrees > 0:
        angle = (torch.rand(b, generator=g) * 2 - 1) * math.radians(cfg.rotate_degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        grid = F.affine_grid(theta.to(image), list(image.shape), align_corners=False)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        mask = F.grid_sample(mask, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if cfg.intensity_jitter > 0:
        scale = 1 + (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * cfg.intensity_jitter
        shift = (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * cfg.intensity_jitter * 0.5
        image = ((image * scale.to(image) + shift.to(image)) * (image > 0)).clamp(0, 1)  # background stays 0
    return image, mask


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def proximal_term(params: list[Tensor], anchor: list[Tensor], mu: float) -> Tensor:
    """FedProx: mu/2 * ||w - w_global||^2 over the trained parameters."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


def stage_loss(
    model: JointModel,
    batch: dict[str, Tensor],
    stage: int,
    pos_weight: Tensor | None,
    device: torch.device,
    cfg: TrainConfig | None = None,
    g: torch.Generator | None = None,
    per_sample: bool = False,
    accel: Acceleration = Acceleration(),
) -> Tensor | None:
    """The loss of one batch for a stage, or None when the batch has nothing to learn from.

    ``per_sample``: a mean of per-slice losses, so that each slice's gradient depends on that
    slice alone (DP-SGD clips per slice; the default Dice pools the batch). The uint8 batch moves
    to ``device`` first (a quarter of the float bytes), then is scaled and augmented there;
    ``accel`` sets autocast and memory format, and the loss is always computed in fp32."""
    if batch["image"].shape[0] == 0:  # DP-SGD's Poisson batches can be empty
        return None
    image = to_input(batch["image"].to(device, non_blocking=True))
    mask = batch["mask"].to(device, non_blocking=True).unsqueeze(1).float()
    augment = cfg is not None and cfg.augment and g is not None
    if stage == 1:
        if augment:
            image, mask = augment_batch(image, mask, cfg, g)
        image = image.contiguous(memory_format=accel.memory_format())
        known = batch["mask_known"].to(device)
        if not bool(known.any()):
            return None
        with accel.autocast(device):
            mask_logits = model.segment(image[known])
        return segmentation_loss(mask_logits.float(), mask[known], per_sample=per_sample)
    labels = batch["labels"][:, output_columns(model)].to(device)
    if bool(torch.isnan(labels).all()):
        return None
    with accel.autocast(device):
        logits = stage2_logits(model, batch, image, mask, device, cfg if augment else None, g, accel)
    return weighted_bce(logits.float(), labels, pos_weight, per_sample=per_sample)


def stage2_logits(
    model: JointModel,
    batch: dict[str, Tensor],
    image: Tensor,
    mask: Tensor,
    device: torch.device,
    augment: TrainConfig | None,
    g: torch.Generator | None,
    accel: Acceleration = Acceleration(),
) -> Tensor:
    """Stage 2's forward with the U-Net frozen: the classifier's image (the ROI or the slice, around
    ``common.roi.placement_mask``: the U-Net's own mask where it finds hematoma, as at test, else the
    reference mask; ``common.model.classifier_image``), augmented when ``augment`` is given, and the
    U-Net's vector. The U-Net's mask and vector come from the batch where stage 2 computed them once
    (``client.training.stage2_features``), else from the frozen U-Net now: both give the same step.
    """
    cfg = model.cfg
    mask = mask * batch["mask_known"].to(device)[:, None, None, None]  # no reference: the U-Net's mask alone
    if UNET_VECTOR in batch:
        own, vector = batch[UNET_MASK].to(device).unsqueeze(1).to(mask.dtype), batch[UNET_VECTOR].to(device)
    else:
        with torch.no_grad():
            own, vector = frozen_unet_outputs(model, image, mask)
    mask = placement_mask(own, mask)
    pixel_mm = batch["pixel_mm"].to(device) if "pixel_mm" in batch else None
    shift = None
    if augment is not None and g is not None and cfg.classifier_input == "roi" and pixel_mm is not None:
        shift = roi_jitter(pixel_mm, image.shape[-1], g)
    crop, crop_mask = classifier_image(cfg, image, mask, pixel_mm, shift=shift)
    if augment is not None and g is not None:
        own, crop_mask = augment_batch(crop[:, :1], crop_mask, augment, g)
        crop = torch.cat([own, crop_mask], dim=1) if crop.shape[1] > 1 else own
    crop = crop.contiguous(memory_format=accel.memory_format())
    return model.classifier(crop, vector)


def trainable_half(model: JointModel, stage: int) -> torch.nn.Module:
    if stage not in STAGES:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    return model.unet if stage == 1 else model.classifier


def train_stage(
    model: JointModel,
    loader: DataLoader,
    stage: int,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    pos_weight: Tensor | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    privacy: PrivateTraining | None = None,
    accel: Acceleration | None = None,
) -> TrainResult:
    """Train one stage for ``cfg.epochs`` over ``loader`` (or ``cfg.max_steps`` steps).

    Stage 2 freezes the U-Net (bit-identical afterwards); stage 1 trains the U-Net only.
    Deterministic by ``cfg.seed``: stochastic layers (dropout, EfficientNet's drop-connect)
    draw from torch's global generator, which is forked and seeded here and restored after.
    ``privacy`` (a :class:`PrivateTraining`, e.g. ``client.training.privacy.DPSGD``): DP-SGD on the trained half, Poisson batches drawn from
    ``loader.dataset``, per-slice losses; every step is a noisy one, an empty batch included.
    ``accel``: default ``Acceleration.for_device(device)``, so the CPU runs the plain loop; DP-SGD
    runs without any (Opacus' per-slice hooks expect the plain fp32 NCHW module).
    """
    accel = Acceleration() if privacy is not None else accel or Acceleration.for_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            return _train_stage(model, loader, stage, cfg, device, pos_weight, progress, on_step, privacy, accel)
        finally:
            if privacy is not None:
                privacy.detach()
            if accel.channels_last:  # state dicts leave in the usual layout (federated exchange, checkpoints)
                model.to(memory_format=torch.contiguous_format)


def _train_stage(
    model: JointModel,
    loader: DataLoader,
    stage: int,
    cfg: TrainConfig,
    device: torch.device | str,
    pos_weight: Tensor | None,
    progress: bool,
    on_step: Callable[[int, float], None] | None,
    privacy: PrivateTraining | None = None,
    accel: Acceleration = Acceleration(),
) -> TrainResult:
    device = torch.device(device)
    model.to(device)
    if accel.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = fed_loader(loader, accel.workers)
    if stage == 2:
        freeze_unet(model)
    else:
        unfreeze_unet(model)
    half = trainable_half(model, stage)
    if accel.compile:
        half.compile()  # in place: the module and its state dict stay as they are
    params = [p for p in half.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None
    opt = make_optimizer(params, cfg)
    if privacy is not None:
        opt, loader = privacy.attach(half, opt, loader, anchor, cfg.proximal_mu)
    total = cfg.epochs * len(loader)
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
        if cfg.schedule == "cosine"
        else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    )
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"stage {stage}", unit="step", leave=False)
    losses, seen, steps, t0 = [], 0, 0, time.perf_counter()
    while steps < total:
        for batch in loader:
            if steps >= total:
                break
            steps += 1
            # Under DP-SGD a batch may come in micro-batches: each one's opt.step() only accumulates its
            # clipped gradients, and the last one's adds the noise and steps (one step per batch).
            loss_sum, n = 0.0, 0
            for part in privacy.micro_batches(batch) if privacy is not None else (batch,):
                loss = stage_loss(model, part, stage, pos_weight, device, cfg, g, privacy is not None, accel)
                if loss is None:
                    if privacy is not None:
                        privacy.empty_step(opt)  # skipping would reveal the empty batch; its noise must still go in
                    continue
                if anchor is not None:
                    loss = loss + proximal_term(params, anchor, cfg.proximal_mu)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                k = int(part["image"].shape[0])
                loss_sum, n = loss_sum + float(loss.detach()) * k, n + k
            sched.step()
            if not n:
                continue
            losses.append(loss_sum / n)
            seen += n
            if on_step is not None:
                on_step(steps, losses[-1])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        if len(loader) == 0:
            break
    if bar is not None:
        bar.close()
    model.eval()
    return TrainResult(float(np.mean(losses)) if losses else float("nan"), seen, steps, time.perf_counter() - t0)
