"""The fast scoring path inside ``predict_study``: U-Net on every brain slice, classifier only where it counts.

The study's marker scores are the maximum over the three slices that hold the most predicted
hematoma (all brain slices when none holds any; ``common.study_metrics.rule_slices``), so the Wavelet
VGG16 (85 % of the joint model's FLOPs) needs to run on those slices only; the others' scores could
never be used. The U-Net runs once per slice, batched, and its
deepest encoder features are kept for the classifier, so nothing is computed twice. Two back ends do
the arithmetic: PyTorch (channels_last) and ONNX Runtime (``client.inference.onnx_runtime``), with an
optional int8 model calibrated on the site's own slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from common.model import JointModel, classifier_inputs
from common.presets import ModelConfig
from common.study_metrics import rule_slices

#: A pixel holds hematoma when its mask probability exceeds this (the mask logit is above 0).
HEMATOMA_PROBABILITY = 0.5
BACKENDS: tuple[str, ...] = ("torch", "onnx")
PARTS: tuple[str, ...] = ("segment", "classify")
CLASSIFY: tuple[str, ...] = ("hematoma", "all")


@dataclass(frozen=True)
class InferenceOptions:
    """How ``predict_study`` computes its slice scores; none of these changes what the study score means.

    backend: "torch" or "onnx" (ONNX Runtime on the CPU; the model is exported once and cached).
    int8: ONNX parts run as int8 models ("segment", "classify"), calibrated on ``calibration``.
    calibration: a site cache folder whose slices calibrate the int8 models.
    classify: "hematoma" (classifier only on slices with predicted hematoma, or all brain slices when
        there are none) or "all" (every brain slice: the reference, as slow as before).
    channels_last: the torch back end's memory format (faster convolutions on CPU and GPU).
    batch_size: slices per forward pass.
    cache_dir: where exported ONNX models are kept (default ``~/.cache/hemexp/onnx``).
    """

    backend: str = "torch"
    int8: tuple[str, ...] = ()
    calibration: Path | None = None
    classify: str = "hematoma"
    channels_last: bool = True
    batch_size: int = 8
    cache_dir: Path | None = None
    threads: int = field(default_factory=torch.get_num_threads)

    def __post_init__(self) -> None:
        object.__setattr__(self, "int8", tuple(self.int8))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.classify not in CLASSIFY:
            raise ValueError(f"classify must be one of {list(CLASSIFY)}, got {self.classify!r}")
        if unknown := set(self.int8) - set(PARTS):
            raise ValueError(f"int8 parts must be among {list(PARTS)}, got {sorted(unknown)}")
        if self.int8 and (self.backend != "onnx" or self.calibration is None):
            raise ValueError("int8 needs backend='onnx' and calibration slices (a site cache folder)")


#: The plain fp32 PyTorch path, every brain slice classified: what the fast options are measured against.
REFERENCE = InferenceOptions(classify="all", channels_last=False)


class SegmentPart(nn.Module):
    """The U-Net half as one module: image [B,1,S,S] -> (mask logits [B,1,S,S], deepest features)."""

    def __init__(self, model: JointModel) -> None:
        super().__init__()
        self.unet = model.unet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.unet.encoder(x)
        return self.unet.segmentation_head(self.unet.decoder(features)), features[-1]


class SliceScorer(Protocol):
    """The two halves of the joint model on float32 numpy batches (images already scaled to [0, 1]);
    ``classify`` takes what ``classifier_feed`` makes of ``segment``'s outputs."""

    def segment(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def classify(self, x: np.ndarray, features: np.ndarray) -> np.ndarray: ...


class TorchScorer:
    """The joint model's halves in PyTorch, inference mode, optionally channels_last."""

    def __init__(self, model: JointModel, device: torch.device | str = "cpu", channels_last: bool = True) -> None:
        self.device = torch.device(device)
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device).eval()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.seg = SegmentPart(self.model)

    def _tensor(self, a: np.ndarray) -> Tensor:
        t = torch.from_numpy(a).to(self.device)
        return t.contiguous(memory_format=self.format) if t.dim() == 4 else t

    @torch.inference_mode()
    def segment(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask_logits, features = self.seg(self._tensor(x))
        return mask_logits.float().cpu().numpy(), features.float().cpu().numpy()

    @torch.inference_mode()
    def classify(self, x: np.ndarray, features: np.ndarray) -> np.ndarray:
        return self.model.classifier(self._tensor(x), self._tensor(features)).float().cpu().numpy()


@dataclass(frozen=True)
class SliceScores:
    """Per input slice: marker logits (NaN where the classifier did not run) and mask probability.

    Logits, not probabilities: the study score is scaled by the checkpoint's temperature first."""

    logits: np.ndarray  # [n, n_out]
    mask_probability: np.ndarray  # [n, S, S] float32
    classified: list[int]

    @property
    def scores(self) -> np.ndarray:
        """Marker probabilities at temperature 1 (NaN where the classifier did not run)."""
        return _sigmoid(self.logits)


def scale_slices(slices: np.ndarray) -> np.ndarray:
    """uint8 [n, S, S] -> float32 [n, 1, S, S] in [0, 1], the same numbers as ``common.model.to_input``."""
    return slices[:, None].astype(np.float32) / np.float32(255.0)


def hematoma_pixels(mask_probability: np.ndarray) -> np.ndarray:
    """Predicted hematoma pixels per slice."""
    return (mask_probability > HEMATOMA_PROBABILITY).reshape(len(mask_probability), -1).sum(axis=1)


def slices_to_classify(pixels: np.ndarray, min_mask_pixels: int, classify: str = "hematoma") -> list[int]:
    """The slices whose scores the study score uses (``common.study_metrics.rule_slices``: those holding
    the most predicted hematoma, all when none holds any); every slice with ``classify="all"``."""
    if classify != "hematoma":
        return list(range(len(pixels)))
    return [int(i) for i in rule_slices(pixels, min_mask_pixels)]


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-a.astype(np.float64)))).astype(np.float32)


def classifier_feed(
    cfg: ModelConfig, x: np.ndarray, mask_logits: np.ndarray, features: np.ndarray, pixel_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's inputs (image, U-Net vector) for scaled slices ``x`` from their segment outputs,
    by the one rule of ``common.model.classifier_inputs`` (the ROI around the U-Net's own mask)."""
    with torch.inference_mode():
        image, vector = classifier_inputs(
            cfg,
            torch.from_numpy(x),
            torch.from_numpy(mask_logits),
            torch.from_numpy(features),
            torch.full((len(x),), float(pixel_mm)),
        )
    return image.numpy(), vector.numpy()


def score_slices(
    scorer: SliceScorer,
    slices: np.ndarray,
    min_mask_pixels: int,
    cfg: ModelConfig,
    pixel_mm: float,
    classify: str = "hematoma",
    batch_size: int = 8,
) -> SliceScores:
    """Segment every slice, then classify the slices ``slices_to_classify`` picks (see the module doc).
    ``pixel_mm``: the side of one preprocessed pixel in mm (the ROI is a physical size)."""
    x = scale_slices(slices)
    parts = [scorer.segment(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    mask_logits = np.concatenate([p[0] for p in parts])
    features = np.concatenate([p[1] for p in parts])
    mask_probability = _sigmoid(mask_logits[:, 0])
    chosen = slices_to_classify(hematoma_pixels(mask_probability), min_mask_pixels, classify)
    logits = []
    for i in range(0, len(chosen), batch_size):
        rows = chosen[i : i + batch_size]
        logits.append(scorer.classify(*classifier_feed(cfg, x[rows], mask_logits[rows], features[rows], pixel_mm)))
    chosen_logits = np.concatenate(logits) if logits else np.zeros((0, 0), dtype=np.float32)
    out = np.full((len(x), chosen_logits.shape[1]), np.nan, dtype=np.float32)
    out[chosen] = chosen_logits
    return SliceScores(out, mask_probability, chosen)
