"""Stage 2 without recomputing the frozen U-Net (docs/design.md §1).

In stage 2 the U-Net never changes, yet a live forward recomputes it at every step (35-40 % of a
step). At the start of stage 2 a site computes, once per set of U-Net weights, each training slice's
U-Net mask (``sigmoid > 0.5``) and vector (the deepest encoder features pooled inside the mask that
places the ROI, ``common.roi.placement_mask``, or over the slice: ``common.model.unet_vector``) and
trains the classifier from them; the classifier's image (the ROI crop) is still cut and augmented at
every step. They are kept on the site's disk keyed by the U-Net's digest and the slices, so the
later stage-2 rounds of a federated run (each a fresh process) load them instead of recomputing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from client.data.dataset import SliceDataset, parts_of
from common.model import JointModel, frozen_unet_outputs, to_input


def unet_digest(model: JointModel) -> str:
    """sha256 of the U-Net half's weights and buffers and of the architecture (what the vectors depend on)."""
    h = hashlib.sha256(repr(sorted(model.cfg.to_dict().items())).encode())
    for key, value in sorted(model.unet.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def slices_key(part: SliceDataset) -> str:
    """Which slices of which cache a vector file holds (the cache folder's name holds its input hash)."""
    h = hashlib.sha256(part.cache.path.name.encode())
    h.update(np.ascontiguousarray(part.indices).tobytes())
    return h.hexdigest()


@torch.inference_mode()
def compute_unet_outputs(
    model: JointModel, part: SliceDataset, device: torch.device | str = "cpu", batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Each slice's U-Net vector ``[N, C]`` float32 (pooled inside ``placement_mask``) and U-Net mask
    ``[N, S, S]`` uint8, from the eval-mode U-Net (as the frozen U-Net runs in stage 2)."""
    device = torch.device(device)
    was_training = model.unet.training
    model.unet.to(device).eval()
    vectors, masks = [], []
    try:
        for batch in DataLoader(part, batch_size=batch_size, shuffle=False):
            reference = batch["mask"].to(device).unsqueeze(1).float()
            own, vector = frozen_unet_outputs(model, to_input(batch["image"], device), reference)
            vectors.append(vector.float().cpu().numpy())
            masks.append(own[:, 0].to(torch.uint8).cpu().numpy())
    finally:
        model.unet.train(was_training)
    if not vectors:
        size = model.cfg.image_size
        return np.zeros((0, model.unet.encoder.out_channels[-1]), np.float32), np.zeros((0, size, size), np.uint8)
    return np.concatenate(vectors), np.concatenate(masks)


def with_unet_vectors(
    model: JointModel,
    ds: Dataset,
    device: torch.device | str = "cpu",
    folder: Path | None = None,
    batch_size: int = 64,
) -> Dataset:
    """``ds`` whose items carry the frozen U-Net's vector and mask, computed once (or loaded from ``folder``).

    Only datasets made of site slices with reference masks get vectors: generated (GAN) slices
    change every round and slices without a mask are placed by the live U-Net, so such a dataset is
    returned as it is and stage 2 runs the U-Net live, with the same result."""
    parts = parts_of(ds)
    if not parts or any(type(p) is not SliceDataset or not p.cache.mask_known()[p.indices].all() for p in parts):
        return ds
    digest = unet_digest(model)[:16] if folder is not None else ""
    out = []
    for part in parts:
        path = folder / f"unet-outputs-{digest}-{slices_key(part)[:16]}.npz" if folder is not None else None
        if path is not None and path.is_file():
            with np.load(path) as stored:
                width = part.cache.images.shape[-1]
                vectors, masks = stored["vectors"], np.unpackbits(stored["masks"], axis=-1, count=width)
        else:
            vectors, masks = compute_unet_outputs(model, part, device, batch_size)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                with open(tmp, "wb") as f:  # masks as bits: 512 px masks are 32 kB a slice
                    np.savez(f, vectors=vectors, masks=np.packbits(masks, axis=-1))
                tmp.replace(path)
        out.append(SliceDataset(part.cache, part.indices, unet_vectors=vectors, unet_masks=masks))
    return out[0] if len(out) == 1 else ConcatDataset(out)
