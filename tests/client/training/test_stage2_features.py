"""Stage 2 from the frozen U-Net's vectors computed once equals stage 2 with the live U-Net, and
trains on the slices holding hematoma only (client.training.stage2_features, client.data.dataset)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset

from client.data.cache import build_site_cache
from client.data.dataset import UNET_VECTOR, SliceDataset, brain_slices, hematoma_slices
from client.training import stage2_features
from client.training.stage2_features import compute_unet_outputs, unet_digest, with_unet_vectors
from client.training.train import TrainConfig, train_stage
from common.config import LABELS, PreprocessConfig
from common.model import build_joint_model, freeze_unet, to_input, unet_vector
from common.presets import get_preset
from common.roi import placement_mask
from tests.helpers.cache import memory_cache, study_entry
from tests.helpers.data import write_site

TINY = get_preset("tiny", image_size=32, roi_size=32)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    path = write_site(root / "site-01", n_studies=6, shape=(5, 32, 32))
    cache, _ = build_site_cache(path, root / "cache", PreprocessConfig(size=32))
    return SliceDataset(cache, brain_slices(cache))


def test_stage2_slices_are_the_hematoma_slices() -> None:
    masks = np.zeros((6, 16, 16), np.uint8)
    masks[1, 2:6, 2:6] = 1  # 16 pixels: holds hematoma
    masks[2, 2:5, 2:5] = 1  # 9 pixels: not more than min_mask_pixels (10)
    masks[4, 0:8, 0:8] = 1  # of a study without a reference mask: unknown, never a stage-2 slice
    labels = np.zeros((6, len(LABELS)), np.float32)
    studies = [study_entry("A", 0, masks[:3], [1, 0, 0, 0, 0]), study_entry("B", 3, masks[3:], [0, 1, 0, 0, 0])]
    studies[1]["has_mask"] = False
    cache = memory_cache(np.zeros_like(masks), masks, labels, studies, min_mask_pixels=10)
    held = hematoma_slices(SliceDataset(cache, np.arange(6)))
    assert held.indices.tolist() == [1]
    pooled = hematoma_slices(ConcatDataset([SliceDataset(cache, np.arange(3)), SliceDataset(cache, np.arange(3, 6))]))
    assert [p.indices.tolist() for p in pooled.datasets] == [[1], []]


def test_outputs_equal_the_live_unet_pooled_inside_the_placement_mask(site) -> None:
    model = build_joint_model(TINY, seed=1)
    ds = hematoma_slices(site)
    vectors, masks = compute_unet_outputs(model, ds, batch_size=3)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))
    with torch.no_grad():
        model.unet.eval()
        x = to_input(batch["image"])
        own = (model.segment(x) > 0).float()
        placed = placement_mask(own, batch["mask"].unsqueeze(1).float())
        expected = unet_vector(TINY, model.unet.encoder(x)[-1], placed)
    assert np.allclose(vectors, expected.numpy(), atol=1e-5)
    assert np.array_equal(masks, own[:, 0].numpy().astype(np.uint8))


def test_placement_is_the_unets_mask_where_it_finds_hematoma() -> None:
    reference = torch.zeros(2, 1, 8, 8)
    reference[:, :, 2:4, 2:4] = 1
    own = torch.zeros(2, 1, 8, 8)
    own[0, 0, 5:7, 5:7] = 1  # slice 0: the U-Net found hematoma elsewhere; slice 1: nothing
    placed = placement_mask(own, reference)
    assert torch.equal(placed[0], own[0]) and torch.equal(placed[1], reference[1])


@pytest.mark.parametrize("classifier_input", ["roi", "slice"])
def test_stage2_from_the_vectors_gives_the_same_step_as_the_live_unet(site, classifier_input: str) -> None:
    cfg = get_preset("tiny", image_size=32, roi_size=32, classifier_input=classifier_input)
    trained = []
    for cached in (False, True):
        model = build_joint_model(cfg, seed=0)
        freeze_unet(model)
        ds = hematoma_slices(site)
        if cached:
            ds = with_unet_vectors(model, ds)
            assert UNET_VECTOR in ds[0]
        loader = TrainConfig(batch_size=4, seed=3).loader(ds, 2)
        train_stage(model, loader, 2, TrainConfig(batch_size=4, lr=1e-2, max_steps=3, seed=3))  # augmented
        trained.append({k: v.clone() for k, v in model.classifier.state_dict().items()})
    for key, value in trained[0].items():
        assert torch.allclose(value.float(), trained[1][key].float(), atol=1e-5), key
    assert any(
        not torch.equal(v, build_joint_model(cfg, seed=0).classifier.state_dict()[k]) for k, v in trained[1].items()
    )


def test_vectors_are_kept_on_disk_by_unet_digest(site, tmp_path, monkeypatch) -> None:
    model = build_joint_model(TINY, seed=0)
    ds = hematoma_slices(site)
    first = with_unet_vectors(model, ds, folder=tmp_path)
    files = sorted(tmp_path.glob("unet-outputs-*.npz"))
    assert len(files) == 1 and unet_digest(model)[:16] in files[0].name

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although the vectors were on disk")

    monkeypatch.setattr(stage2_features, "compute_unet_outputs", fail)
    again = with_unet_vectors(model, ds, folder=tmp_path)
    assert np.array_equal(again.unet_vectors, first.unet_vectors)
    assert np.array_equal(again.unet_masks, first.unet_masks)  # stored as bits, read back whole
    other = build_joint_model(TINY, seed=5)  # other U-Net weights: other vectors, never the stale file
    monkeypatch.undo()
    with_unet_vectors(other, ds, folder=tmp_path)
    assert len(list(tmp_path.glob("unet-outputs-*.npz"))) == 2
