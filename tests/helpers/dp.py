"""Shared by the DP-SGD tests (tests/client/training/): a tiny GroupNorm model and in-memory slices."""

from __future__ import annotations

import math

import torch

from client.training.train import stage_loss
from common.model import build_joint_model
from common.presets import get_preset

IMAGE = 32


class FakeSlices(torch.utils.data.Dataset):
    """In-memory slices in SliceDataset's format: a bright blob as hematoma, labels, masks known."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = (torch.rand(n, IMAGE, IMAGE, generator=g) * 120).to(torch.uint8)
        self.masks = torch.zeros(n, IMAGE, IMAGE, dtype=torch.uint8)
        for i in range(n):
            r, c = 6 + 3 * i % 18, 8 + 5 * i % 16
            self.masks[i, r : r + 6, c : c + 5] = 1
            self.images[i][self.masks[i].bool()] = 220
        self.labels = torch.tensor(
            [[i % 2, (i + 1) % 2, math.nan, i % 3 == 0, 0.0] for i in range(n)], dtype=torch.float32
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.images[i],
            "mask": self.masks[i],
            "labels": self.labels[i],
            "mask_known": torch.tensor(True),
            "study": torch.tensor(i),
            "pixel_mm": torch.tensor(7.0),  # a 224 mm field of view at 32 px
        }


def dp_model():
    model = build_joint_model(get_preset("tiny", image_size=IMAGE, roi_size=32, norm="group"), seed=0)
    model.unet.encoder._drop_connect_rate = 0.0  # deterministic: the hand computations see the same network
    return model


def half_of(model, stage: int):
    return model.unet if stage == 1 else model.classifier


def slice_gradients(model, batch: dict[str, torch.Tensor], stage: int, params: list) -> list[list[torch.Tensor]]:
    """Each slice's own DP-loss gradient, one slice at a time (plain autograd): the hand computation
    the per-slice and per-patient code paths are checked against."""
    out = []
    for i in range(batch["image"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        out.append(
            list(torch.autograd.grad(stage_loss(model, one, stage, None, torch.device("cpu"), per_sample=True), params))
        )
    return out
