"""The hematoma ROI rule (common.roi): centred on the hematoma at any matrix and pixel spacing, the
same physical size everywhere, U-Net features pooled inside the mask, and its inverse for overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import roi
from common.model import build_joint_model, classifier_inputs
from common.presets import get_preset


def disk_slice(size: int, fov_mm: float, centre_mm: tuple[float, float], radius_mm: float) -> torch.Tensor:
    """A [1, 1, size, size] slice of a ``fov_mm`` field of view: brain at 0.4, a disk hematoma at 0.8
    of ``radius_mm`` centred at ``centre_mm`` (x, y from the top-left corner), and a bright 10 mm
    square 20 mm right of the hematoma (to check that the crop shows the same anatomy)."""
    mm = (np.arange(size) + 0.5) * fov_mm / size
    x, y = np.meshgrid(mm, mm)
    image = np.full((size, size), 0.4, dtype=np.float32)
    image[(x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 <= radius_mm**2] = 0.8
    image[(np.abs(x - centre_mm[0] - 20) <= 5) & (np.abs(y - centre_mm[1]) <= 5)] = 1.0
    return torch.from_numpy(image)[None, None]


def hematoma(image: torch.Tensor) -> torch.Tensor:
    return ((image > 0.7) & (image < 0.9)).float()


@pytest.mark.parametrize(("size", "fov_mm"), [(64, 224.0), (128, 224.0), (256, 180.0), (512, 250.0)])
def test_roi_is_centred_on_the_hematoma_at_any_matrix(size: int, fov_mm: float) -> None:
    image = disk_slice(size, fov_mm, (80.0, 130.0), 12.0)
    mask = hematoma(image)
    crops, mask_crop = roi.roi_inputs(image, mask, torch.tensor([fov_mm / size]), 72.0, 64, mask_channel=True)
    assert crops.shape == (1, 2, 64, 64)
    assert torch.equal(crops[:, 1:], mask_crop)
    centre = roi.pixel_centres(64)
    w = mask_crop[0, 0]
    cx = float((w.sum(0) * centre).sum() / w.sum())
    cy = float((w.sum(1) * centre).sum() / w.sum())
    # a 72 mm crop: one crop pixel is 1.125 mm; the centroid is within a quarter of a source pixel
    tolerance = 0.25 * (fov_mm / size) / 36.0
    assert abs(cx) < tolerance + 1e-3 and abs(cy) < tolerance + 1e-3
    # the disk's area in crop pixels is pi (12 mm / 1.125 mm)^2 whatever the matrix (up to pixelation)
    area = float(w.sum())
    assert area == pytest.approx(np.pi * (12 / 1.125) ** 2, rel=0.2)


def test_same_anatomy_in_the_crop_at_two_matrices() -> None:
    crops = []
    for size in (64, 256):
        image = disk_slice(size, 224.0, (100.0, 90.0), 10.0)
        crop, _ = roi.roi_inputs(image, hematoma(image), torch.tensor([224.0 / size]), 72.0, 64, mask_channel=False)
        crops.append(crop[0, 0])
    # the bright square 20 mm right of the centre sits at the same crop pixels at both matrices
    column = 32 + round(20 / 72 * 64)
    assert crops[0][32, column] > 0.9 and crops[1][32, column] > 0.9
    assert float(torch.corrcoef(torch.stack([crops[0].flatten(), crops[1].flatten()]))[0, 1]) > 0.9


def test_empty_mask_falls_back_to_the_most_hematoma_like_pixel() -> None:
    logits = torch.full((2, 1, 32, 32), -5.0)
    logits[0, 0, 7, 20] = -1.0  # below the 0.5 threshold, yet the U-Net's best guess
    mask = torch.zeros(2, 1, 32, 32)
    centres = roi.roi_centres(mask, logits)
    assert torch.allclose(centres[0], torch.tensor([(2 * 20 + 1) / 32 - 1, (2 * 7 + 1) / 32 - 1]))
    assert torch.allclose(roi.roi_centres(mask)[1], torch.zeros(2))


def test_centroid_of_two_pixels() -> None:
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 2, 1] = mask[0, 0, 4, 5] = 1
    c = roi.pixel_centres(8)
    expected = torch.tensor([(c[1] + c[5]) / 2, (c[2] + c[4]) / 2])
    assert torch.allclose(roi.roi_centres(mask)[0], expected)


def test_features_pooled_inside_the_mask() -> None:
    fmap = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, 0, 0:4, 0:4] = 1  # exactly feature cell (0, 0)
    mask[0, 0, 12:16, 8:16] = 1  # cells (3, 2) and (3, 3), twice the area
    pooled = roi.pool_inside(fmap, mask)
    expected0 = (fmap[0, :, 0, 0] + fmap[0, :, 3, 2] + fmap[0, :, 3, 3]) / 3
    assert torch.allclose(pooled[0], expected0)
    assert torch.allclose(pooled[1], fmap[1].mean(dim=(1, 2)))  # empty mask: the whole slice


def test_roi_to_slice_inverts_the_crop() -> None:
    image = disk_slice(64, 224.0, (112.0, 112.0), 14.0)
    mask = hematoma(image)
    pixel_mm = torch.tensor([3.5])
    crop, _ = roi.roi_inputs(image, mask, pixel_mm, 72.0, 64, mask_channel=False)
    centres = roi.roi_centres(mask)
    back = roi.roi_to_slice(crop, centres, roi.roi_half_extent(pixel_mm, 72.0, 64), 64)[0, 0]
    inside = slice(32 - 8, 32 + 8)  # well inside the 72 mm (about 20 px) ROI
    assert torch.allclose(back[inside, inside], image[0, 0, inside, inside], atol=0.06)
    assert float(back[:5].abs().max()) == 0.0  # outside the ROI: nothing


def test_jitter_is_bounded_in_mm() -> None:
    g = torch.Generator().manual_seed(0)
    pixel_mm = torch.tensor([3.5] * 1000)
    shift = roi.roi_jitter(pixel_mm, 64, g)
    mm = shift * 3.5 * 64 / 2
    assert float(mm.abs().max()) <= roi.ROI_JITTER_MM + 1e-4
    assert float(mm.abs().max()) > 0.9 * roi.ROI_JITTER_MM


def test_model_uses_the_roi_of_the_given_mask() -> None:
    cfg = get_preset("tiny")
    model = build_joint_model(cfg, seed=0).eval()
    x = disk_slice(64, 224.0, (60.0, 150.0), 12.0)
    mask = hematoma(x)
    pixel_mm = torch.tensor([3.5])
    with torch.no_grad():
        mask_logits, logits = model(x, mask, pixel_mm)
        fmap = model.unet.encoder(x)[-1]
        crop, _ = roi.roi_inputs(x, mask, pixel_mm, cfg.roi_mm, cfg.roi_size, cfg.roi_mask_channel)
        expected = model.classifier(crop, roi.pool_inside(fmap, mask))
        image, vector = classifier_inputs(cfg, x, mask_logits, fmap, pixel_mm, mask)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.equal(image, crop)
