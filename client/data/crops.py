"""Hematoma-region crops of a site cache: the conditional GAN's training data (docs/gan.md).

A crop is the square around a slice's hematoma mask (its bounding box plus a margin), resized to
the GAN's side: the markers live inside the hematoma, so a small GAN spends its pixels there.
Only slices whose mask is ground truth, whose hematoma is large enough to carry the slice's
labels (the cache's ``min_mask_pixels``) and whose marker label is annotated become crops.

``paste_crop`` is the inverse: it puts a (generated) crop back into a real slice, inside that
slice's hematoma mask, so that a generated sample has the stage-2 input format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from client.data.cache import SiteCache
from common.config import LABELS
from common.gan import GanConfig


@dataclass(frozen=True)
class CropBox:
    """A square window of a slice: top-left corner (may lie outside the slice) and side, in pixels."""

    top: int
    left: int
    side: int


def crop_box(mask: np.ndarray, margin: float, min_side: int) -> CropBox | None:
    """The square around ``mask``'s bounding box, grown by ``margin`` of its side; None if empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    side = max(int(np.ceil(max(h, w) * (1.0 + 2.0 * margin))), min_side)
    centre_r, centre_c = (rows.min() + rows.max() + 1) / 2.0, (cols.min() + cols.max() + 1) / 2.0
    return CropBox(int(round(centre_r - side / 2.0)), int(round(centre_c - side / 2.0)), side)


def _window(image: np.ndarray, box: CropBox) -> np.ndarray:
    """The pixels under ``box``; outside the slice is 0 (air after preprocessing)."""
    out = np.zeros((box.side, box.side), dtype=image.dtype)
    r0, c0 = max(box.top, 0), max(box.left, 0)
    r1, c1 = min(box.top + box.side, image.shape[0]), min(box.left + box.side, image.shape[1])
    out[r0 - box.top : r1 - box.top, c0 - box.left : c1 - box.left] = image[r0:r1, c0:c1]
    return out


def _resize(x: np.ndarray | Tensor, side: int) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float32)[None, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0, 0]


def to_gan_range(u8: np.ndarray | Tensor) -> Tensor:
    """uint8 0..255 -> float32 [-1, 1] (the generator's tanh range)."""
    return torch.as_tensor(np.asarray(u8), dtype=torch.float32) / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """Inverse of ``to_gan_range``, clipped: [-1, 1] -> uint8."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def extract_crop(image: np.ndarray, box: CropBox, size: int) -> Tensor:
    """The crop of a uint8 slice under ``box``, resized to ``size`` x ``size``, in [-1, 1]."""
    return _resize(to_gan_range(_window(image, box)), size).clamp(-1.0, 1.0)


def paste_crop(image: np.ndarray, mask: np.ndarray, crop: Tensor, box: CropBox) -> np.ndarray:
    """A copy of uint8 ``image`` whose pixels inside ``mask`` and ``box`` come from ``crop``.

    ``crop`` ([-1, 1], any side) is resized to the box; outside the hematoma the slice stays real,
    so the brain, the skull stripping and the hematoma's outline are those of a real slice.
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    patch = to_uint8(_resize(crop.detach().cpu().reshape(crop.shape[-2:]), box.side)).numpy()
    r0, c0 = max(box.top, 0), max(box.left, 0)
    r1, c1 = min(box.top + box.side, image.shape[0]), min(box.left + box.side, image.shape[1])
    inside = patch[r0 - box.top : r1 - box.top, c0 - box.left : c1 - box.left]
    region = np.asarray(mask[r0:r1, c0:c1]) > 0
    out[r0:r1, c0:c1][region] = inside[region]
    return out


def crop_slices(cache: SiteCache, indices: np.ndarray, marker: str) -> np.ndarray:
    """The slices of ``indices`` that can become crops: ground-truth mask holding enough hematoma
    (more than the cache's ``min_mask_pixels``) and an annotated ``marker`` label."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return indices
    pixels = np.concatenate([np.asarray(s["mask_pixels"]) for s in cache.studies])[indices]
    label = np.asarray(cache.slice_labels[indices, LABELS.index(marker)])
    min_pixels = int(cache.index.get("preprocess", {}).get("min_mask_pixels", 0))
    return indices[cache.mask_known()[indices] & (pixels > min_pixels) & ~np.isnan(label)]


class HematomaCrops(Dataset):
    """Crops of one site cache's eligible slices: ``(image [1, S, S] in [-1, 1], label)``.

    ``indices`` are candidate slice indices (e.g. a split's training slices); the ineligible ones
    are dropped (see ``crop_slices``). ``slices[i]`` and ``boxes[i]`` say where crop i came from.
    """

    def __init__(self, cache: SiteCache, indices: np.ndarray, cfg: GanConfig) -> None:
        self.cache, self.cfg = cache, cfg
        self.slices = crop_slices(cache, indices, cfg.marker)
        self.boxes = [crop_box(np.asarray(cache.masks[j]), cfg.crop_margin, cfg.crop_min_side) for j in self.slices]
        self._labels = np.asarray(cache.slice_labels[self.slices, LABELS.index(cfg.marker)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.slices.size)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = np.asarray(self.cache.images[int(self.slices[i])])
        return extract_crop(image, self.boxes[i], self.cfg.image_size)[None], int(self._labels[i])

    def labels(self) -> np.ndarray:
        """The marker label (0/1) of every crop."""
        return self._labels.copy()

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All crops at once, ``([N, 1, S, S] float32, [N] int64)``: a site's crops fit in memory."""
        s = self.cfg.image_size
        if not len(self):
            return torch.zeros(0, 1, s, s), torch.zeros(0, dtype=torch.int64)
        return torch.stack([self[i][0] for i in range(len(self))]), torch.from_numpy(self._labels.copy())
