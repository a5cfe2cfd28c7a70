"""Hematoma crops from a site cache: the box, which slices qualify, and pasting a crop back."""

from __future__ import annotations

import numpy as np
import torch

from client.data.crops import CropBox, HematomaCrops, crop_box, crop_slices, extract_crop, paste_crop
from common.config import LABELS
from common.gan import GanConfig
from tests.helpers.cache import memory_cache, study_entry

CFG = GanConfig(g_channels=(8, 8), d_channels=(8, 8), crop_margin=0.5, crop_min_side=4)  # 16-px crops
HYPO = LABELS.index("hypodensity")


def _slice(size: int, rows: slice, cols: slice, inside: int, outside: int = 40) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((size, size), outside, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[rows, cols] = 1
    image[mask > 0] = inside
    return image, mask


def test_crop_box_is_the_grown_square_around_the_mask():
    mask = np.zeros((32, 32), np.uint8)
    mask[10:14, 8:16] = 1  # bbox 4 x 8, centre (12, 12)
    assert crop_box(mask, margin=0.25, min_side=4) == CropBox(top=6, left=6, side=12)  # 8 * 1.5
    assert crop_box(mask, margin=0.0, min_side=20) == CropBox(top=2, left=2, side=20)
    assert crop_box(np.zeros((8, 8)), 0.25, 4) is None


def test_extract_crop_pads_outside_the_slice_and_scales_to_gan_range():
    image = np.full((8, 8), 255, np.uint8)
    crop = extract_crop(image, CropBox(top=-4, left=0, side=8), size=8)
    assert crop.shape == (8, 8)
    assert float(crop[:3].max()) == -1.0  # rows above the slice: air (0 -> -1)
    assert float(crop[5:].min()) == 1.0  # rows inside: 255 -> 1


def test_crop_slices_keeps_annotated_slices_with_a_true_mask_and_enough_hematoma():
    size = 16
    big, small = _slice(size, slice(4, 10), slice(4, 10), 200), _slice(size, slice(4, 5), slice(4, 6), 200)
    images = np.stack([big[0], big[0], small[0], big[0]])
    masks = np.stack([big[1], big[1], small[1], big[1]])
    labels = np.zeros((4, len(LABELS)), np.float32)
    labels[1, HYPO] = np.nan  # not annotated
    studies = [
        study_entry("S-a", 0, masks[:3], [0, 0, 0, 0, None]),
        study_entry("S-b", 3, masks[3:], [0, 0, 0, 0, None], has_mask=False),  # mask not ground truth
    ]
    cache = memory_cache(images, masks, labels, studies, min_mask_pixels=4)
    np.testing.assert_array_equal(crop_slices(cache, np.arange(4), "hypodensity"), [0])


def test_hematoma_crops_give_labelled_crops_centred_on_the_hematoma():
    size = 32
    a_img, a_mask = _slice(size, slice(4, 12), slice(20, 28), 250)
    b_img, b_mask = _slice(size, slice(16, 24), slice(2, 10), 10)
    labels = np.zeros((2, len(LABELS)), np.float32)
    labels[0, HYPO] = 1
    masks = np.stack([a_mask, b_mask])
    cache = memory_cache(np.stack([a_img, b_img]), masks, labels, [study_entry("S-a", 0, masks, [1, 0, 0, 0, None])])
    crops = HematomaCrops(cache, np.arange(2), CFG)
    x, y = crops.tensors()
    assert x.shape == (2, 1, 16, 16) and y.tolist() == [1, 0]
    centre = x[:, 0, 6:10, 6:10].mean(dim=(1, 2))
    assert centre[0] > 0.9 and centre[1] < -0.8  # the hematoma's own intensity fills the crop's centre
    assert crops.boxes[0] == crop_box(a_mask, CFG.crop_margin, CFG.crop_min_side)


def test_paste_crop_changes_only_the_hematoma_pixels():
    image, mask = _slice(32, slice(10, 16), slice(10, 18), 120)
    box = crop_box(mask, 0.5, 4)
    out = paste_crop(image, mask, torch.ones(1, 16, 16), box)
    assert (out[mask > 0] == 255).all()
    np.testing.assert_array_equal(out[mask == 0], image[mask == 0])
    assert (image[mask > 0] == 120).all()  # the input is not modified
