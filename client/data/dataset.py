"""Training data from site caches: patient-wise splits and a torch Dataset over memory maps.

The dataset reads only the cache, never DICOM (docs/design.md §8). Splits are patient-disjoint by
default (the paper's §5.1.1: a random slice split leaks one patient into train and test).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, WeightedRandomSampler

from client.data.cache import SiteCache
from common.config import LABELS
from common.metrics import hematoma_volume_ml

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Slices with less brain than this share of their pixels carry nothing to learn.
MIN_BRAIN_FRACTION = 0.02


def brain_slices(cache: SiteCache, min_fraction: float = MIN_BRAIN_FRACTION) -> np.ndarray:
    """Indices of the cache's slices that show brain."""
    keep = [np.arange(s["start"], s["stop"])[np.asarray(s["brain_fraction"]) >= min_fraction] for s in cache.studies]
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


def split_key(seed: int, site: str) -> bytes:
    """The key of a site's split: derived from the run's seed and the site id, nothing secret.

    Anyone with the same data and seed gets the same split; a site id in the key keeps the
    splits of different sites independent (patient ranks repeat from site to site).
    """
    return hashlib.sha256(f"hemexp-split:{seed}:{site}".encode()).digest()


def _rank(group: str, key: bytes) -> int:
    return int.from_bytes(hmac.new(key, group.encode(), hashlib.sha256).digest()[:8], "big")


def assign_groups(groups: Sequence[str], fractions: Sequence[float], seed: int, site: str = "") -> dict[str, str]:
    """Deterministically assign each distinct group (a patient) to a split by ``fractions``.

    Groups are ranked by a keyed hash (``split_key(seed, site)``), so the assignment depends on
    the seed, the site and the group names only. Every split with a positive fraction gets at
    least one group when there are enough groups, so a small site still has a test patient.
    """
    key = split_key(seed, site)
    distinct = sorted(set(groups), key=lambda g: _rank(g, key))
    n = len(distinct)
    counts = np.floor(np.asarray(fractions, dtype=float) / sum(fractions) * n).astype(int)
    for i in np.argsort(-np.asarray(fractions)):  # hand out the rest, largest fraction first
        if counts.sum() >= n:
            break
        counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0 and n >= len(fractions):
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[i] += 1
    bounds = np.cumsum(counts)
    return {g: SPLITS[int(np.searchsorted(bounds, i, side="right"))] for i, g in enumerate(distinct)}


def study_split_ids(cache: SiteCache) -> list[str]:
    """Per study, the name its patient is split by: source site and ``patient_order``.

    Not the pseudonym: that is keyed by the site's random secret, so a split ranking pseudonyms
    differs on every fresh copy of the data. A virtual site's studies keep their source's name.
    """
    site = cache.index["site_id"]
    return [f"{s.get('source', site)}#{s['patient_order']}" for s in cache.studies]


def followup_slices(cache: SiteCache) -> np.ndarray:
    """Whether each slice belongs to a follow-up study (one that a baseline's ``followup`` names)."""
    names = {s["followup"] for s in cache.studies if s.get("followup")}
    out = np.zeros(cache.n_slices, dtype=bool)
    for s in cache.studies:
        out[s["start"] : s["stop"]] = s["study"] in names
    return out


def split_slices(
    cache: SiteCache,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    by: str = "patient",
    min_brain: float = MIN_BRAIN_FRACTION,
) -> dict[str, np.ndarray]:
    """Slice indices per split. ``by="patient"`` (default) keeps every patient in one split;
    ``by="slice"`` splits slices at random (only to show the leakage effect).

    Follow-up studies train (their masks teach the U-Net) but are not scored: each validation and
    test patient counts once, on the admission CT the clinic runs the model on (the follow-up has no
    marker labels, and scoring it too would weigh patients with a follow-up double in Dice and
    cost a third more evaluation on the benchmark). Membership depends on the seed, the site id and
    the data only (``assign_groups``).
    """
    if by not in ("patient", "slice"):
        raise ValueError(f"split by must be 'patient' or 'slice', got {by!r}")
    idx = brain_slices(cache, min_brain)
    if by == "slice":
        keys = [str(i) for i in idx]
    else:
        patient_of_slice = (
            np.asarray(study_split_ids(cache))[cache.slice_study()] if cache.studies else np.zeros(0, str)
        )
        keys = list(patient_of_slice[idx])
    assignment = assign_groups(keys, fractions, seed, site=cache.index["site_id"])
    split_of = np.asarray([assignment[k] for k in keys]) if len(keys) else np.zeros(0, dtype=str)
    scored = ~followup_slices(cache)[idx]
    return {name: idx[(split_of == name) & (scored | (name == "train"))] for name in SPLITS}


#: Item keys of a slice's frozen-U-Net vector and mask, where stage 2 computed them once
#: (``client.training.stage2_features``).
UNET_VECTOR, UNET_MASK = "unet_vector", "unet_mask"


class SliceDataset(Dataset):
    """Slices of one site cache: uint8 image, uint8 mask, labels (NaN = unknown), mask known, the
    study's pixel size in mm; with ``unet_vectors`` [N, C] and ``unet_masks`` [N, S, S] (uint8) also each
    slice's frozen-U-Net vector and mask."""

    def __init__(
        self,
        cache: SiteCache,
        indices: np.ndarray,
        unet_vectors: np.ndarray | None = None,
        unet_masks: np.ndarray | None = None,
    ):
        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64)
        for name, given in (("vectors", unet_vectors), ("masks", unet_masks)):
            if given is not None and len(given) != len(self.indices):
                raise ValueError(f"{len(given)} U-Net {name} for {len(self.indices)} slices")
        self.unet_vectors, self.unet_masks = unet_vectors, unet_masks
        self._known = cache.mask_known()
        self._study = cache.slice_study()
        self._pixel_mm = study_pixel_mm(cache)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.indices[i])
        item = {
            "image": torch.from_numpy(np.array(self.cache.images[j])),
            "mask": torch.from_numpy(np.array(self.cache.masks[j])),
            "labels": torch.from_numpy(np.array(self.cache.slice_labels[j])),
            "mask_known": torch.tensor(bool(self._known[j])),
            "study": torch.tensor(int(self._study[j])),
            "pixel_mm": torch.tensor(float(self._pixel_mm[self._study[j]])),
        }
        if self.unet_vectors is not None and self.unet_masks is not None:
            item[UNET_VECTOR] = torch.from_numpy(self.unet_vectors[i])
            item[UNET_MASK] = torch.from_numpy(np.array(self.unet_masks[i]))
        return item

    def labels(self) -> np.ndarray:
        """Slice labels ``[N, len(LABELS)]`` of this dataset's slices (NaN = unknown)."""
        return (
            np.asarray(self.cache.slice_labels[self.indices]) if len(self) else np.zeros((0, len(LABELS)), np.float32)
        )

    def hematoma_pixels(self) -> np.ndarray:
        """Reference hematoma pixels per slice (0 where the study has no mask)."""
        per_slice = (
            np.concatenate([np.asarray(s["mask_pixels"]) for s in self.cache.studies])
            if self.cache.studies
            else np.zeros(0)
        )
        return per_slice[self.indices] if len(self) else np.zeros(0, dtype=np.int64)

    def voxel_ml(self) -> np.ndarray:
        """Volume of one model-resolution voxel in ml, per slice (for hematoma volumes: the one rule,
        ``common.metrics.hematoma_volume_ml``, of one voxel)."""
        per_study = np.asarray([hematoma_volume_ml(1, s["pixel_mm"], s["slice_mm"]) for s in self.cache.studies])
        return per_study[self._study[self.indices]] if len(self) else np.zeros(0)

    def study_labels(self) -> dict[str, np.ndarray]:
        """Study-level labels (LABELS order, NaN = not annotated) of the studies in this dataset."""
        keys = self.study_keys()
        out = {}
        for s in self.cache.studies:
            key = f"{self.cache.path.name}/{s['study']}"
            out[key] = np.asarray([np.nan if v is None else v for v in s["labels"]], dtype=np.float32)
        return {k: out[k] for k in np.unique(keys)}

    def study_keys(self) -> np.ndarray:
        """A study key per slice, unique across sites (cache name + study pseudonym)."""
        names = np.asarray([f"{self.cache.path.name}/{s['study']}" for s in self.cache.studies])
        return names[self._study[self.indices]] if len(self) else np.zeros(0, dtype=str)

    def patient_keys(self) -> np.ndarray:
        """A patient key per slice, unique across sites and the same on every copy of the data
        (site id + ``study_split_ids``), so that a bootstrap over patients is reproducible."""
        site = self.cache.index["site_id"]
        names = np.asarray([f"{site}/{k}" for k in study_split_ids(self.cache)])
        return names[self._study[self.indices]] if len(self) else np.zeros(0, dtype=str)

    @property
    def min_mask_pixels(self) -> int:
        """Pixels a mask needs on a slice for the slice to hold hematoma (the cache's preprocessing)."""
        return int(self.cache.index["preprocess"]["min_mask_pixels"])


def study_pixel_mm(cache: SiteCache) -> np.ndarray:
    """Per study of the cache, the side of one model pixel in mm (what the ROI's physical size needs).
    Slices are square-pixelled after preprocessing, so one number per study."""
    return np.asarray([float(s["pixel_mm"][1]) for s in cache.studies], dtype=np.float32)


def holds_hematoma(ds: SliceDataset) -> np.ndarray:
    """Per slice of ``ds``, whether its reference mask holds hematoma (the slices that carry marker labels)."""
    if not len(ds):
        return np.zeros(0, dtype=bool)
    return ds.cache.mask_known()[ds.indices] & (ds.hematoma_pixels() > ds.min_mask_pixels)


def hematoma_slices(ds: Dataset) -> Dataset:
    """Stage 2's training slices: those whose reference mask holds hematoma, per site part.

    The study rule scores the slices holding (predicted) hematoma only, and a slice without hematoma
    carries label 0 for every marker by construction: trained on every brain slice, the classifier
    learns hematoma detection, not the markers (docs/design.md §1). Generated (GAN) slices are kept
    whole: they are pasted into hematoma slices."""
    parts = [
        SliceDataset(p.cache, p.indices[holds_hematoma(p)]) if type(p) is SliceDataset else p for p in parts_of(ds)
    ]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def pooled(datasets: list[Dataset]) -> Dataset:
    """Several sites' datasets as one (the non-empty ones; a single one as it is)."""
    non_empty = [d for d in datasets if len(d)]
    return non_empty[0] if len(non_empty) == 1 else ConcatDataset(non_empty)


def parts_of(ds: Dataset) -> list[SliceDataset]:
    """The site datasets inside a (possibly pooled) dataset."""
    return list(ds.datasets) if isinstance(ds, ConcatDataset) else [ds]


def dataset_labels(ds: Dataset) -> np.ndarray:
    parts = parts_of(ds)
    return np.concatenate([p.labels() for p in parts]) if parts else np.zeros((0, len(LABELS)), np.float32)


def dataset_study_keys(ds: Dataset) -> np.ndarray:
    parts = parts_of(ds)
    return np.concatenate([p.study_keys() for p in parts]) if parts else np.zeros(0, dtype=str)


def dataset_patient_keys(ds: Dataset) -> np.ndarray:
    parts = parts_of(ds)
    return np.concatenate([p.patient_keys() for p in parts]) if parts else np.zeros(0, dtype=str)


def balanced_weights(positive: np.ndarray) -> np.ndarray:
    """Sampling weight per slice so that the ``positive`` slices make up about half of the draws.

    Rare events (a marker, or hematoma pixels at all) otherwise appear in too few batches.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos, n = int(positive.sum()), positive.size
    if n_pos in (0, n):
        return np.ones(n)
    return np.where(positive, 0.5 / n_pos, 0.5 / (n - n_pos)) * n


def stage_positives(ds: Dataset, stage: int) -> np.ndarray:
    """What balanced sampling balances: hematoma slices in stage 1, marker-positive slices in stage 2."""
    if stage == 1:
        return np.concatenate([p.hematoma_pixels() for p in parts_of(ds)]) > 0
    labels = dataset_labels(ds)
    return np.nan_to_num(labels, nan=0.0).max(axis=1) > 0 if labels.size else np.zeros(0, bool)


def make_loader(
    ds: Dataset, batch_size: int, shuffle: bool, seed: int, balanced: bool = False, stage: int = 2
) -> DataLoader:
    """A deterministic loader (seeded generator); ``balanced`` samples the stage's positives more often."""
    g = torch.Generator().manual_seed(seed)
    if balanced and shuffle and len(ds):
        w = balanced_weights(stage_positives(ds, stage))
        sampler = WeightedRandomSampler(
            torch.as_tensor(w, dtype=torch.double), num_samples=len(ds), replacement=True, generator=g
        )
        return DataLoader(ds, batch_size=batch_size, sampler=sampler)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None)
