"""The hematoma-centred region of interest (ROI) that the marker classifier sees (docs/design.md §1).

At 64 px a marker-bearing hematoma fills about 1 % of a slice, and a classifier that pools the whole
slice spends almost all of its capacity on brain without any marker. The field's practice for
expansion markers is "segment, then classify the hematoma region"; this module is the one rule that
decides that region, for training, evaluation, ``hemexp predict``/``serve``, the DICOM results and
Grad-CAM alike:

- **centre**: the centroid of the slice's hematoma mask (the reference mask in training, the
  U-Net's own mask ``sigmoid > 0.5`` everywhere else); on a slice without mask pixels, the pixel the
  U-Net finds most hematoma-like (its highest mask logit), so every slice still has a defined ROI;
- **size**: a square of ``roi_mm`` millimetres, whatever the matrix and pixel spacing (the same
  anatomy at 64 px and at 512 px), resampled to ``roi_size`` x ``roi_size`` pixels;
- **U-Net features**: the U-Net encoder's deepest feature map averaged inside the same mask, not
  over the whole slice (the whole slice when the mask is empty).

Written with torch's ``affine_grid``/``grid_sample`` rather than an image library because the crop
must be batched, differentiable, run on the GPU and export to ONNX as part of the model; scikit-image
or scipy would do one slice at a time on the CPU. Coordinates are torch's normalised ones
(``align_corners=False``: -1 and 1 are the outer edges of the first and last pixel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: A pixel belongs to the hematoma when its mask value (a probability or a 0/1 mask) exceeds this.
MASK_THRESHOLD = 0.5
#: Training jitter of the ROI centre: up to this many mm in x and in y (about 2 pixels at 64 px),
#: so that the classifier does not learn that a hematoma is always exactly centred (the U-Net's
#: mask, which places the ROI at test, differs from the reference mask by about that much).
ROI_JITTER_MM = 7.0


def placement_mask(unet_mask: Tensor, reference: Tensor) -> Tensor:
    """The mask that places a training slice's ROI (and pools its U-Net features): the U-Net's own
    mask where it finds hematoma on the slice, as at test; the reference mask where it finds none.

    Measured on the benchmark (pooled, seed 0): trained around the reference masks and scored around
    the U-Net's, the classifier lost 0.065 macro study AUROC against scoring around the reference
    masks (blend sign 0.47 vs 0.62): the mask channel and the centre it learnt from are not the ones
    it is shown at test. Both masks are [B, 1, H, W]."""
    found = (unet_mask > MASK_THRESHOLD).flatten(1).any(dim=1)
    return torch.where(found[:, None, None, None], unet_mask.to(reference.dtype), reference)


def pixel_centres(size: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised coordinates of the ``size`` pixel centres along one axis (``align_corners=False``)."""
    return (torch.arange(size, device=device, dtype=dtype) * 2 + 1) / size - 1


def roi_centres(mask: Tensor, fallback_logits: Tensor | None = None) -> Tensor:
    """Per slice, the ROI centre ``(x, y)`` in normalised coordinates: the mask's centroid.

    ``mask`` [B, 1, H, W]: 0/1 or probabilities (pixels above ``MASK_THRESHOLD`` count). Where a slice
    has no mask pixel, the centre is the pixel with the highest ``fallback_logits`` [B, 1, H, W] (the
    U-Net's mask logits), or the image centre without them.
    """
    b, _, h, w = mask.shape
    inside = (mask > MASK_THRESHOLD).to(torch.float32)[:, 0]
    ys, xs = pixel_centres(h, mask.device), pixel_centres(w, mask.device)
    n = inside.sum(dim=(1, 2))
    cx = (inside.sum(dim=1) * xs).sum(dim=1) / n.clamp(min=1)
    cy = (inside.sum(dim=2) * ys).sum(dim=1) / n.clamp(min=1)
    if fallback_logits is None:
        fx = torch.zeros_like(cx)
        fy = torch.zeros_like(cy)
    else:
        flat = fallback_logits[:, 0].reshape(b, -1).argmax(dim=1)
        fx, fy = xs[flat % w], ys[torch.div(flat, w, rounding_mode="floor")]
    empty = n == 0
    return torch.stack([torch.where(empty, fx, cx), torch.where(empty, fy, cy)], dim=1)


def roi_half_extent(pixel_mm: Tensor, roi_mm: float, width: int) -> Tensor:
    """Half the ROI's side in normalised units: ``roi_mm`` over the slice's width in mm (pixel_mm x width)."""
    return roi_mm / (pixel_mm.to(torch.float32) * width)


def roi_jitter(pixel_mm: Tensor, width: int, g: torch.Generator) -> Tensor:
    """Random centre shifts [B, 2] (normalised units), uniform within +-``ROI_JITTER_MM``, drawn from ``g``
    on the CPU (the same draws on any device)."""
    b = pixel_mm.shape[0]
    mm = (torch.rand(b, 2, generator=g) * 2 - 1) * ROI_JITTER_MM
    return mm.to(pixel_mm.device) * 2 / (pixel_mm.to(torch.float32)[:, None] * width)


def roi_grid(centres: Tensor, half_extent: Tensor, size: int) -> Tensor:
    """The sampling grid [B, size, size, 2] of a square ROI per slice (``F.grid_sample``'s input)."""
    b = centres.shape[0]
    theta = torch.zeros(b, 2, 3, device=centres.device, dtype=torch.float32)
    theta[:, 0, 0] = half_extent
    theta[:, 1, 1] = half_extent
    theta[:, :, 2] = centres
    return F.affine_grid(theta, [b, 1, size, size], align_corners=False)


def crop(images: Tensor, grid: Tensor) -> Tensor:
    """``images`` [B, C, H, W] sampled on ``grid`` (bilinear; zero, i.e. air, outside the slice)."""
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def pool_inside(feature_map: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``feature_map`` [B, C, h, w] inside ``mask`` [B, 1, H, W] (area-weighted on the
    feature grid); the plain mean over the slice where the mask is empty. Returns [B, C]."""
    inside = (mask > MASK_THRESHOLD).to(feature_map.dtype)
    weight = F.adaptive_avg_pool2d(inside, feature_map.shape[-2:])
    total = weight.sum(dim=(2, 3))
    pooled = (feature_map * weight).sum(dim=(2, 3)) / total.clamp(min=1e-8)
    return torch.where(total > 0, pooled, feature_map.mean(dim=(2, 3)))


def roi_inputs(
    image: Tensor,
    mask: Tensor,
    pixel_mm: Tensor,
    roi_mm: float,
    roi_size: int,
    mask_channel: bool,
    fallback_logits: Tensor | None = None,
    shift: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """THE ROI rule: the crops the classifier sees and the mask they were centred on.

    ``image`` [B, 1, H, W] in [0, 1], ``mask`` [B, 1, H, W], ``pixel_mm`` [B] (model-pixel size).
    ``shift`` [B, 2] moves each centre by that many normalised units (training jitter). Returns
    ``(crops [B, 1 or 2, roi_size, roi_size], mask crops [B, 1, roi_size, roi_size])``: with
    ``mask_channel`` the crop's second channel is the mask (0/1).
    """
    centres = roi_centres(mask, fallback_logits)
    if shift is not None:
        centres = centres + shift.to(centres)
    grid = roi_grid(centres, roi_half_extent(pixel_mm.to(image.device), roi_mm, image.shape[-1]), roi_size)
    inside = (mask > MASK_THRESHOLD).to(image.dtype)
    both = crop(torch.cat([image, inside], dim=1), grid)
    image_crop, mask_crop = both[:, :1], both[:, 1:]
    return (both if mask_channel else image_crop), mask_crop


def roi_to_slice(values: Tensor, centres: Tensor, half_extent: Tensor, size: int) -> Tensor:
    """The inverse of the crop: ROI maps ``values`` [B, C, r, r] (e.g. a Grad-CAM) laid back onto the
    slice grid [B, C, size, size] where the ROI was cut, zero outside it (what an overlay draws)."""
    b = values.shape[0]
    scale = 1.0 / half_extent.to(torch.float32)
    theta = torch.zeros(b, 2, 3, device=values.device, dtype=torch.float32)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = -centres * scale[:, None]
    grid = F.affine_grid(theta, [b, 1, size, size], align_corners=False)
    return F.grid_sample(values, grid.to(values.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
