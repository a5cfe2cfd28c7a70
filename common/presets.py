"""Model presets: the joint model's architecture as data (docs/design.md §1, §6).

A preset is a frozen :class:`ModelConfig`; ``PRESETS`` maps a name to one, and
``get_preset(name, **overrides)`` returns a copy with some fields changed. Every site
and the server build the same architecture from the same config, so the config is
what travels (``to_dict``/``from_dict``), never a pickled module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from common.config import LABELS, MARKERS, check_known_keys

#: Classifier backbones: the paper's Wavelet VGG16 and the plain VGG16 of its ablation (§5.2.1).
CLASSIFIERS: tuple[str, ...] = ("wavelet", "vgg")
#: How the four wavelet sub-bands (4C channels) enter the next VGG block.
#: "project": a 1x1 convolution mixes them back to C channels (the layout whose size and cost
#: docs/design.md §6 measured: 30.3 M parameters for the paper preset); "concat": the next 3x3
#: convolution takes all 4C channels directly (about 9 M parameters more at full width).
BAND_FUSIONS: tuple[str, ...] = ("project", "concat")
#: Normalisation layers: "group" is what Opacus DP-SGD needs (docs/design.md §5).
NORMS: tuple[str, ...] = ("batch", "group")
#: Spatial reduction of the classifier: five halvings, as VGG16's five pooling layers.
CLASSIFIER_STRIDE: int = 32
#: What the classifier sees: "roi", the hematoma-centred region (common.roi; the default), or
#: "slice", the whole slice (the source paper's model, kept for its ablations).
CLASSIFIER_INPUTS: tuple[str, ...] = ("roi", "slice")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the joint U-Net + Wavelet-VGG16 model (docs/design.md §1).

    Attributes
    ----------
    encoder_name: smp encoder of the U-Net (the paper: ``efficientnet-b3``).
    encoder_depth: number of encoder stages (3..5); ``decoder_channels`` has one entry per stage.
    decoder_channels: U-Net decoder widths, deepest first.
    classifier: "wavelet" (pooling replaced by a Haar DWT) or "vgg" (max pooling).
    classifier_width: multiplier of VGG16's widths 64-128-256-512-512.
    wavelet: any pywt wavelet name; "haar" as in the paper.
    band_fusion: see ``BAND_FUSIONS``.
    image_size: side of the square input in pixels; a multiple of 32.
    in_channels: CT slices are single-channel.
    n_markers: how many of ``MARKERS`` the head predicts (in that order).
    predict_expansion: add one output for ``expansion`` after the markers.
    masked_input: the classifier sees only the hematoma (paper §5.2.2): ground-truth mask in
        training, the U-Net's own mask otherwise.
    head_hidden: width of the head's hidden layer; 0 for a linear head.
    dropout: dropout before the head's last layer.
    norm: "batch" or "group" (Opacus needs GroupNorm).
    classifier_input: "roi" (hematoma-centred crops, ``common.roi``) or "slice" (the paper's whole slice).
    roi_mm: side of the ROI in mm (the same anatomy at any matrix and pixel spacing).
    roi_size: side of the ROI crop in pixels (a multiple of 32, the classifier's stride).
    roi_mask_channel: the ROI crop carries the hematoma mask as a second channel.
    """

    encoder_name: str = "efficientnet-b3"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    classifier: str = "wavelet"
    classifier_width: float = 1.0
    wavelet: str = "haar"
    band_fusion: str = "project"
    image_size: int = 512
    in_channels: int = 1
    n_markers: int = len(MARKERS)
    predict_expansion: bool = False
    masked_input: bool = False
    head_hidden: int = 256
    dropout: float = 0.2
    norm: str = "batch"
    classifier_input: str = "roi"
    roi_mm: float = 72.0
    roi_size: int = 64
    roi_mask_channel: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        _check_choice("classifier", self.classifier, CLASSIFIERS)
        _check_choice("band_fusion", self.band_fusion, BAND_FUSIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("classifier_input", self.classifier_input, CLASSIFIER_INPUTS)
        if self.roi_size <= 0 or self.roi_size % CLASSIFIER_STRIDE:
            raise ValueError(f"roi_size must be a positive multiple of 32, got {self.roi_size}")
        if not self.roi_mm > 0:
            raise ValueError(f"roi_mm must be > 0, got {self.roi_mm}")
        if not 2 <= self.encoder_depth <= 5:
            raise ValueError(f"encoder_depth must be in 2..5, got {self.encoder_depth}")
        if len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(
                f"decoder_channels needs one width per encoder stage ({self.encoder_depth}), "
                f"got {self.decoder_channels}"
            )
        if self.image_size <= 0 or self.image_size % CLASSIFIER_STRIDE:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        if not self.classifier_width > 0:
            raise ValueError(f"classifier_width must be > 0, got {self.classifier_width}")
        if not 0 <= self.n_markers <= len(MARKERS):
            raise ValueError(f"n_markers must be in 0..{len(MARKERS)}, got {self.n_markers}")
        if self.n_outputs < 1:
            raise ValueError("the model needs at least one output (n_markers or predict_expansion)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.head_hidden < 0 or self.in_channels < 1:
            raise ValueError("head_hidden must be >= 0 and in_channels >= 1")

    @property
    def n_outputs(self) -> int:
        """Number of classifier logits: the markers, then expansion if predicted."""
        return self.n_markers + int(self.predict_expansion)

    @property
    def classifier_channels(self) -> int:
        """Channels of the classifier's image input: the slice's, plus the ROI's mask channel."""
        roi_mask = self.classifier_input == "roi" and self.roi_mask_channel
        return self.in_channels + int(roi_mask)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Label name of each classifier logit, in output order."""
        names = MARKERS[: self.n_markers]
        return names + (LABELS[-1],) if self.predict_expansion else names

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/TOML-friendly dict (tuples become lists)."""
        d = asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped. A config written
        before the ROI classifier existed (no ``classifier_input``) describes the whole-slice model."""
        kw = check_known_keys(cls, d, "model config")
        kw.setdefault("classifier_input", "slice")
        return cls(**kw)


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")


#: Named presets. "paper": the source paper's model (docs/design.md §1). "small": CPU demo size,
#: so that a 12-site federation trains on 2 cores. "tiny": unit tests only.
PRESETS: dict[str, ModelConfig] = {
    "paper": ModelConfig(roi_size=128),
    "small": ModelConfig(
        encoder_name="efficientnet-b0",
        encoder_depth=5,
        decoder_channels=(64, 32, 16, 8, 8),
        classifier_width=0.25,
        image_size=128,
        head_hidden=64,
    ),
    "tiny": ModelConfig(
        encoder_name="efficientnet-b0",
        encoder_depth=3,
        decoder_channels=(32, 16, 8),
        classifier_width=0.125,
        image_size=64,
        head_hidden=32,
        dropout=0.0,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset called ``name``, with ``overrides`` applied (validated like any config)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}") from None
    return replace(base, **check_known_keys(ModelConfig, overrides, "model config")) if overrides else base
