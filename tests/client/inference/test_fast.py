"""The fast scoring path: same study scores and masks as the plain fp32 path, classifier only where used."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.data.cache import build_site_cache
from client.data.dataset import SliceDataset, brain_slices, make_loader
from client.inference.fast import (
    REFERENCE,
    InferenceOptions,
    hematoma_pixels,
    score_slices,
    slices_to_classify,
)
from client.inference.predict import predict_study, run_prediction
from client.training.train import TrainConfig, train_stage
from common.checkpoint import Checkpoint, save_checkpoint
from common.config import PreprocessConfig
from common.model import build_joint_model
from common.presets import get_preset
from tests.helpers.data import head_phantom, write_series, write_site

TINY = get_preset("tiny")
PRE = PreprocessConfig(size=TINY.image_size)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


@pytest.fixture(scope="module")
def site_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    cache, _ = build_site_cache(write_site(root / "site-01", n_studies=3, shape=(6, 64, 64)), root / "cache", PRE)
    return cache


@pytest.fixture(scope="module")
def checkpoint(site_cache):
    """A tiny model whose U-Net has learnt the phantom's blob (decisive masks, as a trained model's)."""
    model = build_joint_model(TINY, seed=0)
    loader = make_loader(SliceDataset(site_cache, brain_slices(site_cache)), 8, shuffle=True, seed=0)
    train_stage(model, loader, 1, TrainConfig(epochs=100, max_steps=80, lr=1e-2, augment=False))
    return Checkpoint(TINY, PRE, TINY.output_names, {}, {}), model.eval()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """No brain on slice 0; on slices 1-4 a hole (air) where the hematoma is on slices 5-9."""
    folder = tmp_path_factory.mktemp("study") / "s"
    hu = head_phantom((10, 64, 64), seed=3)
    hu[0] = -1000.0
    rr, cc = np.mgrid[0:64, 0:64]
    hu[1:5, np.hypot(rr - 64 * 0.45, cc - 64 * 0.55) < 9] = -1000.0
    write_series(folder, hu, spacing=(5.0, 0.8, 0.8))
    return folder


def test_slices_to_classify_is_the_study_rule() -> None:
    assert slices_to_classify(np.array([0, 11, 3, 50]), 10) == [1, 3]
    assert slices_to_classify(np.array([0, 11, 3, 50]), 10, "all") == [0, 1, 2, 3]
    assert slices_to_classify(np.array([0, 2, 3]), 10) == [0, 1, 2]  # none holds hematoma: all
    # More hematoma slices than the rule scores: only the three largest are classified.
    assert slices_to_classify(np.array([11, 80, 0, 30, 12, 50]), 10) == [1, 3, 5]


class CountingScorer:
    """A scorer with known outputs: slice i's mask has i * 4 positive pixels, its logits are i."""

    def __init__(self) -> None:
        self.classified: list[float] = []

    def segment(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.round(x[:, 0, 0, 0] * 255).astype(int)
        logits = np.full(x.shape, -5.0, dtype=np.float32)
        for j, i in enumerate(ids):
            logits[j, 0, 1, : 4 * i] = 5.0
        return logits, ids[:, None, None, None].astype(np.float32)

    def classify(self, x: np.ndarray, features: np.ndarray) -> np.ndarray:
        self.classified += list(features[:, 0])  # the whole-slice classifier's vector: the map's mean
        return np.repeat(features[:, :1], 2, axis=1) - 3.0


def test_score_slices_classifies_only_hematoma_slices_in_batches() -> None:
    slices = np.zeros((6, 8, 32), dtype=np.uint8)
    slices[:, 0, 0] = np.arange(6)
    scorer = CountingScorer()
    cfg = get_preset("tiny", classifier_input="slice")
    out = score_slices(scorer, slices, min_mask_pixels=10, cfg=cfg, pixel_mm=3.5, batch_size=2)
    assert out.classified == [3, 4, 5] and scorer.classified == [3.0, 4.0, 5.0]
    assert np.isnan(out.scores[:3]).all()
    np.testing.assert_allclose(out.scores[3:, 0], 1 / (1 + np.exp(-(np.arange(3, 6) - 3.0))), rtol=1e-6)
    np.testing.assert_array_equal(hematoma_pixels(out.mask_probability), 4 * np.arange(6))


def _agreement(study, ckpt, model, options):
    ref = predict_study(study, ckpt, model=model, options=REFERENCE)
    fast = predict_study(study, ckpt, model=model, options=options)
    delta = max(abs(fast.markers[k] - ref.markers[k]) for k in ref.markers)
    return ref, fast, delta


def test_torch_fast_path_matches_the_plain_path(study, checkpoint) -> None:
    ckpt, model = checkpoint
    ref, fast, delta = _agreement(study, ckpt, model, InferenceOptions())
    assert 0 < len(ref.hematoma_slices) < len(ref.brain_slices), "the test needs brain slices to skip"
    assert fast.hematoma_slices == ref.hematoma_slices and delta < 1e-5
    assert dice(fast.mask_probability, ref.mask_probability) > 0.999
    # The fast path classifies only the slices the study rule scores: the three with most hematoma.
    pixels = (ref.mask_probability > 0.5).reshape(len(ref.mask_probability), -1).sum(axis=1)
    scored = sorted(sorted(ref.hematoma_slices, key=lambda k: (-pixels[k], k))[:3])
    skipped = sorted(set(ref.brain_slices) - set(scored))
    assert np.isnan(fast.slice_scores[skipped]).all() and not np.isnan(ref.slice_scores[skipped]).any()
    np.testing.assert_allclose(fast.slice_scores[scored], ref.slice_scores[scored], atol=1e-5)
    assert set(json.loads(json.dumps(fast.to_json()))["slice_scores"]) == {str(k) for k in scored}


def test_onnx_fp32_and_int8_agree_with_the_plain_path(study, checkpoint, site_cache, tmp_path) -> None:
    ckpt, model = checkpoint
    onnx = InferenceOptions(backend="onnx", cache_dir=tmp_path / "onnx")
    ref, fast, delta = _agreement(study, ckpt, model, onnx)
    assert delta < 1e-4 and dice(fast.mask_probability, ref.mask_probability) > 0.999
    parts = ("segment", "classify")
    int8 = InferenceOptions(backend="onnx", int8=parts, calibration=site_cache.path, cache_dir=tmp_path / "onnx")
    _, quantised, delta8 = _agreement(study, ckpt, model, int8)
    assert len(list((tmp_path / "onnx").rglob("*.int8-*.onnx"))) == 2
    assert delta8 < 0.01 and dice(quantised.mask_probability, ref.mask_probability) > 0.99


def test_calibration_includes_the_slices_where_the_model_sees_most_hematoma(site_cache, checkpoint) -> None:
    """Half the int8 calibration slices are those where the fp32 U-Net predicts the most hematoma
    (computed here independently over every brain slice); the rest are chosen by reference masks."""
    from client.inference.fast import TorchScorer, scale_slices
    from client.inference.onnx_runtime import calibration_slices

    _, model = checkpoint
    images = np.asarray(site_cache.images[brain_slices(site_cache)])
    logits = TorchScorer(model, "cpu", channels_last=False).segment(scale_slices(images))[0]
    predicted = (logits[:, 0] > 0).reshape(len(images), -1).sum(axis=1)
    n = 4
    chosen = calibration_slices(site_cache.path, model, n=n)
    assert chosen.shape == (n, *images.shape[1:])
    top = images[np.argsort(-predicted, kind="stable")[: n // 2]]
    assert all(any(np.array_equal(t, c) for c in chosen) for t in top)
    assert predicted.max() > 0  # the check means something: the model does find hematoma


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="int8 needs"):
        InferenceOptions(int8=("segment",))
    with pytest.raises(ValueError, match="backend"):
        InferenceOptions(backend="tensorrt")
    with pytest.raises(ValueError, match="int8 parts"):
        InferenceOptions(backend="onnx", int8=("head",), calibration=None)


def test_run_prediction_scores_with_the_fast_path(study, checkpoint, tmp_path) -> None:
    ckpt, model = checkpoint
    path = save_checkpoint(tmp_path / "ckpt.pt", model, TINY, PRE, {"method": "test"})
    result = run_prediction(study, path, tmp_path / "out")
    ref = predict_study(study, ckpt, model=model, options=REFERENCE)
    assert result["hematoma_slices"] == ref.hematoma_slices
    for name, p in ref.markers.items():
        assert abs(result["markers"][name] - p) < 1e-5
    assert (tmp_path / "out" / "overlay.png").stat().st_size > 0
