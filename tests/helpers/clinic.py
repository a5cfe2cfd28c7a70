"""Clinic test data: a generated CT study with fake PHI, tiny checkpoints whose U-Net marks a few per
cent of the slice (an untrained U-Net marks nothing, and an empty mask would prove little), and a
scan for leaked identifiers."""

from __future__ import annotations

from pathlib import Path

import torch

from client.ingest.dicom import read_study
from client.preprocessing.pipeline import preprocess_volume
from common.checkpoint import save_checkpoint
from common.config import PreprocessConfig
from common.model import build_joint_model, to_input
from common.presets import get_preset
from tests.helpers.data import PHI, head_phantom, write_series

#: Share of the model-grid pixels the "marking" checkpoint calls hematoma.
MARKED_SHARE = 0.03


def write_study(folder: Path, n_slices: int = 6, seed: int = 0, **kwargs) -> Path:
    """Non-square slices and anisotropic pixels: the mapping back to the DICOM grid must undo the
    preprocessing's padding, resize and centring shift."""
    write_series(folder, head_phantom((n_slices, 48, 40), seed=seed), spacing=(5.0, 0.8, 0.9), seed=seed, **kwargs)
    return folder


def tiny_checkpoint(path: Path, study: Path, meta: dict, marked_share: float | None = MARKED_SHARE) -> Path:
    """Tiny preset with the expansion head; the segmentation bias set so that ``marked_share`` of the
    study's model-grid pixels have a mask probability above 0.5 (None: the untrained prior, no mask)."""
    cfg = get_preset("tiny", predict_expansion=True)
    pre = PreprocessConfig(size=cfg.image_size)
    model = build_joint_model(cfg, seed=0).eval()
    if marked_share is not None:
        slices = preprocess_volume(read_study(study).volume, None, pre).slices
        bias = model.unet.segmentation_head[0].bias
        with torch.no_grad():
            bias.zero_()
            logits = model.segment(to_input(slices, "cpu"))
            bias.fill_(-float(torch.quantile(logits.flatten(), 1.0 - marked_share)))
    return save_checkpoint(path, model, cfg, pre, meta)


def phi_strings() -> list[str]:
    """The fake PHI of ``tests.helpers.data`` and the study's folder names, as they would leak."""
    return [str(v) for v in PHI.values() if len(str(v)) > 8] + ["MRN-PID-77441", "ACC99182736"]


def leaks(paths: list[Path], texts: tuple[str, ...] = ()) -> list[str]:
    """Every file (bytes) or text in which a PHI string occurs."""
    found = []
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            data = file.read_bytes()
            found += [f"{file.name}: {s}" for s in phi_strings() if s.encode() in data]
    found += [f"text: {s}" for t in texts for s in phi_strings() if s in t]
    return found
