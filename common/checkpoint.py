"""The checkpoint format shared by pooled training, sites, the server and ``hemexp predict``.

A checkpoint is a ``torch.save``d dict of plain types only, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs on load):

``{"format": "hemexp-checkpoint/1", "model_config": ModelConfig.to_dict(),
"preprocess": PreprocessConfig.to_dict(), "labels": [output names], "state_dict": {name: Tensor},
"meta": {free-form str/int/float/None: stage, round, method, created ...}}``, plus
``"gan": {name: Tensor}`` in the checkpoints of a federated GAN round only (G and D,
``common.gan.gan_state_dict``, so that ``resume`` continues the GAN stage; docs/gan.md). A
checkpoint after a stage-2 round never holds it: generator weights can reproduce training crops,
and ``global.pt`` / ``best.pt`` go to clinics.

It never holds a patient identifier: weights, configs and aggregate numbers only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.config import PreprocessConfig
from common.presets import ModelConfig

FORMAT = "hemexp-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    model_config: ModelConfig
    preprocess: PreprocessConfig
    labels: tuple[str, ...]
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    gan: dict[str, torch.Tensor] | None = None


def save_checkpoint(
    path: Path | str,
    model: torch.nn.Module,
    model_config: ModelConfig,
    preprocess: PreprocessConfig,
    meta: dict[str, Any] | None = None,
    gan: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves half a checkpoint.
    ``gan``: a GAN round's G and D state (module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "model_config": model_config.to_dict(),
        "preprocess": preprocess.to_dict(),
        "labels": list(model_config.output_names),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    if gan is not None:
        payload["gan"] = {k: v.detach().cpu().clone() for k, v in gan.items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Load safely (``weights_only=True``); ValueError naming the file if it is not ours."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint")
    return Checkpoint(
        ModelConfig.from_dict(payload["model_config"]),
        PreprocessConfig.from_dict(payload["preprocess"]),
        tuple(payload["labels"]),
        payload["state_dict"],
        payload["meta"],
        payload.get("gan"),
    )


def build_from_checkpoint(ckpt: Checkpoint, device: torch.device | str = "cpu") -> torch.nn.Module:
    from common.model import build_joint_model

    model = build_joint_model(ckpt.model_config)
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.to(device).eval()
