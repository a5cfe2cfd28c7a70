"""The joint segmentation + marker-classification model (docs/design.md §1; paper §4, Fig. 1).

A U-Net (smp, EfficientNet encoder) segments the hematoma; a Wavelet VGG16 (VGG16 whose
pooling layers are 2-D Haar DWTs, so texture survives downsampling) classifies the markers
from its own features plus the U-Net encoder's deepest features. One ``forward`` returns
``(mask_logits, marker_logits)``, so training, evaluation and aggregation handle one module.

Two-stage training (paper §4): stage 1 trains ``model.unet`` (``segment`` skips the
classifier); stage 2 trains ``model.classifier`` after ``freeze_unet``. Federated rounds
exchange one half at a time (``half_state_dict`` / ``load_half_state_dict``).

Heavy imports (smp, timm, pywt) happen when a model is built, not at import,
so the server can import the state-dict helpers cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from common import roi
from common.presets import ModelConfig

#: The two halves that federated rounds exchange separately (stage 1: unet, stage 2: classifier).
HALVES: tuple[str, ...] = ("unet", "classifier")
#: VGG16's convolutional blocks: (width, number of 3x3 convolutions); a pooling layer follows each.
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
#: smp EfficientNet encoders keep the ImageNet head's conv and norm, never used by their forward;
#: dropping them saves traffic every round and lets Opacus run (docs/design.md §6).
_UNUSED_ENCODER_MODULES: tuple[str, ...] = ("_conv_head", "_bn1")


def dwt_kernel(wave: str) -> Tensor:
    """The four 2-D analysis filters of a one-level DWT as one [4, 1, L, L] convolution kernel.

    Band ``k = 2 * r + c`` filters the width with row filter ``r`` and the height with column filter
    ``c`` (0: low-pass, 1: high-pass): LL, LH, HL, HH in pytorch_wavelets' order, so checkpoints trained
    with its ``DWTForward`` keep their meaning. The filters are reversed because ``conv2d`` correlates.
    """
    import pywt

    w = pywt.Wavelet(wave)
    lo, hi = np.asarray(w.dec_lo[::-1]), np.asarray(w.dec_hi[::-1])
    bank = [np.outer(col, row) for row in (lo, hi) for col in (lo, hi)]
    return torch.tensor(np.stack(bank), dtype=torch.float32).unsqueeze(1)


def _zero_mode_padding(n: int, taps: int) -> tuple[int, int]:
    """Zeros before and after a side of ``n`` samples so that a stride-2 filter of ``taps`` taps
    gives pywt's ``mode="zero"`` coefficients (``pywt.dwt_coeff_len``); none for Haar on even sides."""
    out = (n + taps - 1) // 2
    p = 2 * (out - 1) - n + taps
    return p // 2, p // 2 + p % 2


class WaveletPool(nn.Module):
    """One-level 2-D DWT as a pooling layer: [B, C, H, W] -> [B, 4C, H/2, W/2], lossless.

    The four sub-bands stay as channels, grouped per input channel: output channel
    ``4 * c + k`` is sub-band ``k`` (0: LL, 1: LH, 2: HL, 3: HH, pytorch_wavelets' order) of
    input channel ``c``. The transform is one fixed stride-2 convolution per channel, so it runs in
    whatever precision autocast picks (pytorch_wavelets' DWT fails under bf16 autocast), exports
    to ONNX and quantises like any convolution. The kernel is a non-persistent buffer: a
    constant, not a weight to ship.
    """

    def __init__(self, wave: str = "haar") -> None:
        super().__init__()
        self.register_buffer("kernel", dwt_kernel(wave), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        taps = self.kernel.shape[-1]
        top, bottom = _zero_mode_padding(x.shape[-2], taps)
        left, right = _zero_mode_padding(x.shape[-1], taps)
        if top or bottom or left or right:
            x = nn.functional.pad(x, (left, right, top, bottom))
        b, c, h, w = x.shape
        # every channel is one image to the 4 filters: [B*C, 1, H, W] -> [B*C, 4, h, w] -> [B, 4C, h, w]
        y = nn.functional.conv2d(x.reshape(b * c, 1, h, w), self.kernel.to(x.dtype), stride=2)
        return y.reshape(b, 4 * c, y.shape[-2], y.shape[-1])

    @staticmethod
    def split_bands(y: Tensor) -> tuple[Tensor, Tensor]:
        """Undo the channel folding: ``(yl [B,C,h,w], yh [B,C,3,h,w])`` as pytorch_wavelets has them."""
        b, c4, h, w = y.shape
        bands = y.reshape(b, c4 // 4, 4, h, w)
        return bands[:, :, 0], bands[:, :, 1:]


def _norm2d(channels: int, norm: str) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(_groups(channels), channels)


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 32 (the usual choice), always dividing ``channels``."""
    return math.gcd(channels, 32)


def _conv_block(c_in: int, c_out: int, norm: str) -> list[nn.Module]:
    # ReLU not in place: Opacus' per-sample hooks need the activations intact (docs/design.md §5).
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm2d(c_out, norm), nn.ReLU()]


def vgg16_widths(width: float) -> tuple[int, ...]:
    """VGG16's block widths 64-128-256-512-512 scaled by ``width`` (at least 4 channels)."""
    return tuple(max(4, int(round(w * width))) for w, _ in VGG16_BLOCKS)


class WaveletVGG16(nn.Module):
    """VGG16's 13 conv layers with each of its 5 poolings a ``WaveletPool`` (or max pooling).

    ``pool="wavelet"``: after each DWT the 4C sub-band channels either pass through a 1x1
    convolution back to C ("project") or feed the next 3x3 convolution whole ("concat").
    ``pool="max"`` is the plain VGG16 of the paper's ablation (§5.2.1). The output is the
    globally average-pooled feature vector, ``out_features`` long.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: float = 1.0,
        pool: str = "wavelet",
        wavelet: str = "haar",
        band_fusion: str = "project",
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if pool not in ("wavelet", "max"):
            raise ValueError(f"pool must be 'wavelet' or 'max', got {pool!r}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for c, (_, n_convs) in zip(vgg16_widths(width), VGG16_BLOCKS):
            for _ in range(n_convs):
                layers += _conv_block(c_in, c, norm)
                c_in = c
            if pool == "max":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(WaveletPool(wavelet))
                if band_fusion == "project":
                    layers += [nn.Conv2d(4 * c, c, 1, bias=False), _norm2d(c, norm)]
                else:
                    c_in = 4 * c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = c_in
        _init_vgg(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.features(x)).flatten(1)


def _init_vgg(module: nn.Module) -> None:
    """torchvision's VGG initialisation (training starts from scratch: nothing is downloaded)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _head(in_features: int, hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    if hidden == 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, n_out))
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


class MarkerClassifier(nn.Module):
    """Wavelet VGG16 + head: logits from concat(VGG features, pooled U-Net encoder features).

    Its inputs are what ``classifier_inputs`` makes of a slice: the whole slice or the hematoma
    ROI (``cfg.classifier_input``), and the U-Net's deepest features already pooled to a vector, so
    that stage 2 can train from features computed once (``client.training.stage2_features``).
    """

    def __init__(self, cfg: ModelConfig, unet_features: int) -> None:
        super().__init__()
        self.backbone = WaveletVGG16(
            in_channels=cfg.classifier_channels,
            width=cfg.classifier_width,
            pool="wavelet" if cfg.classifier == "wavelet" else "max",
            wavelet=cfg.wavelet,
            band_fusion=cfg.band_fusion,
            norm=cfg.norm,
        )
        self.head = _head(self.backbone.out_features + unet_features, cfg.head_hidden, cfg.n_outputs, cfg.dropout)
        _init_vgg(self.head)

    def forward(self, image: Tensor, unet_vector: Tensor) -> Tensor:
        """``image`` [B, classifier_channels, s, s], ``unet_vector`` [B, C] (``unet_vector``)."""
        own = self.backbone(image)
        return self.head(torch.cat([own, unet_vector.to(own.dtype)], dim=1))


def unet_vector(cfg: ModelConfig, feature_map: Tensor, mask: Tensor) -> Tensor:
    """The U-Net's deepest features [B, C, h, w] as the classifier's vector [B, C]: averaged inside
    the hematoma ``mask`` [B, 1, H, W] for the ROI classifier, over the whole slice for the paper's."""
    if cfg.classifier_input == "roi":
        return roi.pool_inside(feature_map, mask)
    return feature_map.mean(dim=(2, 3))


def classifier_image(
    cfg: ModelConfig,
    x: Tensor,
    mask: Tensor,
    pixel_mm: Tensor | None,
    mask_logits: Tensor | None = None,
    shift: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """What the classifier's backbone sees of slices ``x`` [B, 1, H, W], and the mask aligned to it.

    ``cfg.classifier_input == "roi"``: the hematoma ROI of ``common.roi.roi_inputs`` (``pixel_mm`` [B]
    needed: the ROI is a physical size; ``mask_logits`` place the ROI of a slice without mask
    pixels; ``shift`` jitters it in training). ``"slice"``: the whole slice, times the mask with
    ``cfg.masked_input`` (paper §5.2.2).
    """
    if cfg.classifier_input == "roi":
        if pixel_mm is None:
            raise ValueError("the ROI classifier needs each slice's pixel size in mm (pixel_mm)")
        return roi.roi_inputs(
            x, mask, pixel_mm, cfg.roi_mm, cfg.roi_size, cfg.roi_mask_channel, fallback_logits=mask_logits, shift=shift
        )
    keep = (mask > roi.MASK_THRESHOLD).to(x.dtype)
    return (x * keep if cfg.masked_input else x), keep


def frozen_unet_outputs(model: JointModel, x: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Stage 2's U-Net outputs of slices ``x``, from one pass: its own mask (0/1, [B, 1, H, W]) and its
    vector pooled inside ``common.roi.placement_mask(own, reference)`` (``reference`` 0 where unknown)."""
    mask_logits, deepest = model.segment_with_features(x)
    own = (mask_logits > 0).to(reference.dtype)
    return own, unet_vector(model.cfg, deepest, roi.placement_mask(own, reference))


def classifier_inputs(
    cfg: ModelConfig,
    x: Tensor,
    mask_logits: Tensor,
    feature_map: Tensor,
    pixel_mm: Tensor | None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The classifier's two inputs (image, U-Net vector) for slices ``x``: around ``mask`` when given
    (the reference mask in training), else around the U-Net's own mask (``mask_logits > 0``).

    The one place that turns a segmented slice into classifier input, for evaluation, ``hemexp
    predict``/``serve`` (torch and ONNX), Grad-CAM and the DICOM results alike."""
    use = (mask_logits.detach() > 0).to(x.dtype) if mask is None else mask.to(x.dtype)
    image, _ = classifier_image(cfg, x, use, pixel_mm, mask_logits.detach())
    return image, unet_vector(cfg, feature_map, use)


#: smp's EfficientNet sets BatchNorm momentum 0.01 (TensorFlow's 0.99 decay): its running
#: statistics then lag the weights for hundreds of steps, and a short local training scores
#: Dice 0 in eval mode while train mode segments well. PyTorch's default 0.1 tracks them.
BATCHNORM_MOMENTUM: float = 0.1
#: Initial bias of the mask head: logit of a 2 % hematoma prior.
SEGMENTATION_PRIOR_LOGIT: float = -4.0


class JointModel(nn.Module):
    """U-Net (``self.unet``) + marker classifier (``self.classifier``) with one forward.

    ``forward(x, mask=None, pixel_mm=None)`` takes ``x`` [B, in_channels, H, W] in [0, 1] (see
    ``to_input``) and returns ``(mask_logits [B, 1, H, W], marker_logits [B, n_outputs])``. The
    classifier sees the hematoma ROI (``cfg.classifier_input = "roi"``, ``common.roi``) or the whole
    slice (the paper's; with ``cfg.masked_input`` times the mask, paper §5.2.2), placed by the given
    (ground-truth) mask in training, else by the U-Net's own ``sigmoid > 0.5``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        self.cfg = cfg
        self.unet = smp.Unet(
            encoder_name=cfg.encoder_name,
            encoder_depth=cfg.encoder_depth,
            encoder_weights=None,  # nothing downloads; initial weights come from the server
            decoder_channels=cfg.decoder_channels,
            in_channels=cfg.in_channels,
            classes=1,
        )
        _drop_unused_encoder_modules(self.unet.encoder)
        # Start the mask head at a small hematoma prior (about 2 % of pixels) instead of 50 %:
        # the first steps then refine the hematoma instead of unlearning a half-white mask.
        nn.init.constant_(self.unet.segmentation_head[0].bias, SEGMENTATION_PRIOR_LOGIT)
        self.classifier = MarkerClassifier(cfg, self.unet.encoder.out_channels[-1])
        _set_batchnorm_momentum(self, BATCHNORM_MOMENTUM)
        if cfg.norm == "group":
            _batchnorm_to_groupnorm(self)
        _relu_not_inplace(self)
        self._unet_frozen = False

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.cfg.output_names

    @property
    def unet_frozen(self) -> bool:
        return self._unet_frozen

    def segment(self, x: Tensor) -> Tensor:
        """Mask logits only: stage 1 needs no classifier (85 % of the FLOPs, docs/design.md §6)."""
        return self.unet(x)

    def forward(self, x: Tensor, mask: Tensor | None = None, pixel_mm: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``mask`` [B, 1, H, W] (or [B, H, W]): where the classifier looks (the ROI's mask, or the
        masked input); None: the U-Net's own mask. ``pixel_mm`` [B]: needed by the ROI classifier."""
        self.unet.check_input_shape(x)
        mask_logits, deepest = self.segment_with_features(x)
        if mask is not None and mask.dim() != x.dim():
            mask = mask.unsqueeze(1)
        image, vector = classifier_inputs(self.cfg, x, mask_logits, deepest, pixel_mm, mask)
        return mask_logits, self.classifier(image, vector)

    def segment_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mask logits and the encoder's deepest features, from one U-Net pass."""
        features = self.unet.encoder(x)
        return self.unet.segmentation_head(self.unet.decoder(features)), features[-1]

    def train(self, mode: bool = True) -> JointModel:
        """As ``nn.Module.train``, except that a frozen U-Net stays in eval mode."""
        super().train(mode)
        if self._unet_frozen:
            self.unet.eval()
        return self


def _drop_unused_encoder_modules(encoder: nn.Module) -> None:
    """Remove smp EfficientNet modules that the encoder's forward never reaches.

    Unused parameters would travel every round, and DP-SGD (Opacus) rejects them. With
    ``encoder_depth < 5`` the blocks after the last returned stage are cut too; the
    drop-connect rate is rescaled so that the kept blocks keep their original rates.
    """
    for name in _UNUSED_ENCODER_MODULES:
        if hasattr(encoder, name):
            delattr(encoder, name)
    blocks, out_indexes = getattr(encoder, "_blocks", None), getattr(encoder, "_out_indexes", None)
    depth = getattr(encoder, "_depth", 5)
    if blocks is None or out_indexes is None or depth >= 5:
        return
    keep = out_indexes[depth - 2] + 1
    encoder._drop_connect_rate *= keep / len(blocks)
    encoder._blocks = blocks[:keep]


def _set_batchnorm_momentum(model: nn.Module, momentum: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def _batchnorm_to_groupnorm(model: nn.Module) -> None:
    """Swap every BatchNorm2d for GroupNorm (what Opacus' ``ModuleValidator.fix`` does)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                gn = nn.GroupNorm(_groups(child.num_features), child.num_features, eps=child.eps)
                setattr(parent, name, gn)
            elif isinstance(child, nn.modules.batchnorm._BatchNorm):
                raise ValueError(
                    f"cannot swap {type(child).__name__} at {name!r} for GroupNorm; "
                    "choose an encoder built from plain nn.BatchNorm2d"
                )


def _relu_not_inplace(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU)) and getattr(m, "inplace", False):
            m.inplace = False


def build_joint_model(cfg: ModelConfig, seed: int | None = None) -> JointModel:
    """Build the joint model, randomly initialised; ``seed`` makes it reproducible
    without touching the caller's global RNG state."""
    if seed is None:
        return JointModel(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return JointModel(cfg)


def to_input(batch: np.ndarray | Tensor, device: torch.device | str | None = None) -> Tensor:
    """Preprocessed uint8 slices [B, H, W] or [B, 1, H, W] -> float32 [B, 1, H, W] in [0, 1].

    Only uint8 is accepted: the cache stores 0..255, and a float input would mean the
    scaling happened already (or never).
    """
    t = torch.as_tensor(batch)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 slices (0..255), got {t.dtype}")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise ValueError(f"expected [B, H, W] or [B, 1, H, W], got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32) / 255.0


def freeze_unet(model: JointModel) -> None:
    """Stage 2: U-Net weights fixed (paper §4) and its norm statistics too (eval mode)."""
    for p in model.unet.parameters():
        p.requires_grad_(False)
    model.unet.eval()
    model._unet_frozen = True


def unfreeze_unet(model: JointModel) -> None:
    """Undo ``freeze_unet``; the U-Net follows ``model.training`` again."""
    for p in model.unet.parameters():
        p.requires_grad_(True)
    model._unet_frozen = False
    model.unet.train(model.training)


def _check_half(half: str) -> str:
    if half not in HALVES:
        raise KeyError(f"unknown model half {half!r}; valid halves: {list(HALVES)}")
    return half + "."


def half_state_dict(model: JointModel, half: str) -> dict[str, Tensor]:
    """A detached copy of one half's parameters and buffers, keyed as in ``model.state_dict()``
    (``unet.…`` / ``classifier.…``), so halves merge back into a full state dict."""
    prefix = _check_half(half)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def load_half_state_dict(model: JointModel, half: str, state: Mapping[str, Tensor | np.ndarray]) -> None:
    """Load one half (keys as ``half_state_dict`` gives them); every key must match exactly."""
    prefix = _check_half(half)
    expected = {k for k in model.state_dict() if k.startswith(prefix)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(
            f"state for half {half!r} does not match the model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    sub = {k[len(prefix) :]: torch.as_tensor(v) for k, v in state.items()}
    getattr(model, half).load_state_dict(sub, strict=True)


def norm_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of normalisation layers (what FedBN keeps local, docs/design.md §5)."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return {
        f"{name}.{key}" if name else key
        for name, m in model.named_modules()
        if isinstance(m, norm_types)
        for key in m.state_dict(keep_vars=True)
        if "." not in key
    }


def count_parameters(model: nn.Module, halves: Sequence[str] | None = None) -> int:
    """Number of parameters, of the whole model or of the named halves."""
    if halves is None:
        return sum(p.numel() for p in model.parameters())
    for h in halves:
        _check_half(h)
    return sum(p.numel() for h in halves for p in getattr(model, h).parameters())
