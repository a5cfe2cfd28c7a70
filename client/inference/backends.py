"""The scoring back end of a run: PyTorch or ONNX Runtime (``client.inference.fast``, ``.onnx_runtime``)."""

from __future__ import annotations

from pathlib import Path

import torch

from client.inference.fast import InferenceOptions, SliceScorer, TorchScorer
from client.inference.onnx_runtime import OnnxScorer
from common.model import JointModel


def options_for(
    device: torch.device | str, backend: str = "auto", int8: tuple[str, ...] = (), calibration: Path | None = None
) -> InferenceOptions:
    """``hemexp predict``'s choice: "auto" is ONNX Runtime on the CPU (PyTorch's CPU kernels are slower
    on EfficientNet) and PyTorch on a GPU."""
    if backend == "auto":
        backend = "onnx" if torch.device(device).type == "cpu" else "torch"
    return InferenceOptions(backend=backend, int8=int8, calibration=calibration)


def make_scorer(model: JointModel, device: torch.device | str, options: InferenceOptions) -> SliceScorer:
    """The back end ``options`` asks for (ONNX models exported and cached on first use)."""
    if options.backend == "torch":
        return TorchScorer(model, device, options.channels_last)
    if torch.device(device).type != "cpu":
        raise ValueError("the ONNX back end runs on the CPU; use backend='torch' on a GPU")
    return OnnxScorer.for_model(model, options)
