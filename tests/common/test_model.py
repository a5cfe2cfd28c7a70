"""The joint model: shapes per preset, lossless wavelet pooling, stage-2 freezing, halves."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pywt
import torch
from torch import nn

from common.config import MARKERS
from common.losses import weighted_bce
from common.model import (
    HALVES,
    JointModel,
    WaveletPool,
    build_joint_model,
    count_parameters,
    freeze_unet,
    half_state_dict,
    load_half_state_dict,
    norm_state_keys,
    to_input,
    unfreeze_unet,
)
from common.presets import PRESETS, ModelConfig, get_preset


def _batch(cfg: ModelConfig, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)


def _mm(x: torch.Tensor) -> torch.Tensor:
    """A 225 mm field of view's pixel size for each slice of ``x`` (the ROI classifier needs one)."""
    return torch.full((x.shape[0],), 225.0 / x.shape[-1])


class BaseModelTester:
    """Checks every buildable configuration must pass; subclasses name the configuration."""

    preset = "tiny"
    overrides: dict = {}

    @pytest.fixture(scope="class")
    @classmethod
    def cfg(cls) -> ModelConfig:
        return get_preset(cls.preset, **cls.overrides)

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls, cfg: ModelConfig) -> JointModel:
        return build_joint_model(cfg, seed=0).eval()

    def test_output_shapes(self, cfg: ModelConfig, model: JointModel) -> None:
        x = _batch(cfg)
        with torch.no_grad():
            mask_logits, marker_logits = model(x, pixel_mm=_mm(x))
        assert mask_logits.shape == (2, 1, cfg.image_size, cfg.image_size)
        assert marker_logits.shape == (2, cfg.n_outputs)
        assert torch.isfinite(mask_logits).all() and torch.isfinite(marker_logits).all()

    def test_segment_matches_forward(self, cfg: ModelConfig, model: JointModel) -> None:
        x = _batch(cfg)
        with torch.no_grad():
            assert torch.allclose(model.segment(x), model(x, pixel_mm=_mm(x))[0], atol=1e-6)

    def test_relu_not_inplace(self, model: JointModel) -> None:
        assert not any(getattr(m, "inplace", False) for m in model.modules() if isinstance(m, nn.ReLU))

    def test_dwt_filters_not_in_state_dict(self, model: JointModel) -> None:
        assert not any(k.endswith("kernel") for k in model.state_dict())

    def test_halves_partition_the_state(self, model: JointModel) -> None:
        keys = set(model.state_dict())
        parts = [set(half_state_dict(model, h)) for h in HALVES]
        assert set.union(*parts) == keys and not set.intersection(*parts)


class TestTinyModel(BaseModelTester):
    preset = "tiny"


class TestSmallModel(BaseModelTester):
    preset = "small"


class TestPlainVGGClassifier(BaseModelTester):
    overrides = {"classifier": "vgg"}

    def test_no_wavelet(self, model: JointModel) -> None:
        assert not any(isinstance(m, WaveletPool) for m in model.modules())
        assert sum(isinstance(m, nn.MaxPool2d) for m in model.classifier.modules()) == 5


class TestConcatBands(BaseModelTester):
    overrides = {"band_fusion": "concat"}

    def test_wider_than_projection(self, model: JointModel) -> None:
        assert model.classifier.backbone.out_features == 4 * get_preset("tiny").classifier_width * 512


class TestGroupNorm(BaseModelTester):
    overrides = {"norm": "group", "predict_expansion": True}

    def test_no_batchnorm_left(self, model: JointModel) -> None:
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert any(isinstance(m, nn.GroupNorm) for m in model.unet.encoder.modules())

    def test_expansion_output(self, model: JointModel) -> None:
        assert model.output_names == MARKERS + ("expansion",)


class TestWholeSliceClassifier(BaseModelTester):
    overrides = {"classifier_input": "slice"}

    def test_no_pixel_size_needed(self, cfg: ModelConfig, model: JointModel) -> None:
        with torch.no_grad():
            assert model(_batch(cfg))[1].shape == (2, cfg.n_outputs)
        assert model.classifier.backbone.features[0].in_channels == 1

    def test_roi_classifier_refuses_without_pixel_size(self, cfg: ModelConfig) -> None:
        roi_model = build_joint_model(get_preset("tiny"), seed=0).eval()
        with pytest.raises(ValueError, match="pixel size in mm"):
            roi_model(_batch(cfg))
        assert roi_model.classifier.backbone.features[0].in_channels == 2  # slice + mask channel


class TestMaskedInput(BaseModelTester):
    overrides = {"masked_input": True, "classifier_input": "slice"}

    def test_given_mask_gates_classifier_input(self, cfg: ModelConfig, model: JointModel) -> None:
        x = _batch(cfg)
        mask = torch.zeros(2, cfg.image_size, cfg.image_size)
        mask[:, 10:30, 20:40] = 1
        with torch.no_grad():
            _, logits = model(x, mask)
            feats = model.unet.encoder(x)
            expected = model.classifier(x * mask[:, None], feats[-1].mean(dim=(2, 3)))
        assert torch.allclose(logits, expected, atol=1e-6)

    def test_predicted_mask_without_ground_truth(self, cfg: ModelConfig, model: JointModel) -> None:
        x = _batch(cfg)
        with torch.no_grad():
            mask_logits, logits = model(x)
            feats = model.unet.encoder(x)
            expected = model.classifier(x * (torch.sigmoid(mask_logits) > 0.5).float(), feats[-1].mean(dim=(2, 3)))
        assert torch.allclose(logits, expected, atol=1e-6)


def test_paper_preset_size_and_small_forward() -> None:
    model = build_joint_model(PRESETS["paper"], seed=0).eval()
    n = count_parameters(model)
    assert 29e6 < n < 31.5e6, n  # docs/design.md §6: 30.3 M (less the unused EfficientNet head conv)
    assert count_parameters(model, ["unet"]) + count_parameters(model, ["classifier"]) == n
    with torch.no_grad():
        mask_logits, marker_logits = model(torch.rand(1, 1, 64, 64), pixel_mm=torch.tensor([3.5]))
    assert mask_logits.shape == (1, 1, 64, 64) and marker_logits.shape == (1, len(MARKERS))


class TestWaveletPool:
    def test_shape_and_channel_folding(self) -> None:
        y = WaveletPool()(torch.rand(2, 3, 16, 12))
        assert y.shape == (2, 12, 8, 6)

    def test_lossless(self) -> None:
        with warnings.catch_warnings():  # pytorch_wavelets imports pkg_resources (docs/design.md §6)
            warnings.simplefilter("ignore")
            from pytorch_wavelets import DWTInverse

        x = torch.rand(2, 3, 32, 32, dtype=torch.float64).float()
        yl, yh = WaveletPool.split_bands(WaveletPool("haar")(x))
        recon = DWTInverse(wave="haar", mode="zero")((yl, [yh]))
        assert torch.allclose(recon, x, atol=1e-5)

    @pytest.mark.parametrize("wave", ["haar", "db2"])
    @pytest.mark.parametrize("shape", [(32, 24), (17, 11)])
    def test_matches_pywt(self, wave: str, shape: tuple[int, int]) -> None:
        img = np.random.default_rng(0).random(shape)
        ca, (ch, cv, cd) = pywt.dwt2(img, wave, mode="zero")
        yl, yh = WaveletPool.split_bands(WaveletPool(wave)(torch.tensor(img, dtype=torch.float32)[None, None]))
        for ours, ref in [(yl[0, 0], ca), (yh[0, 0, 0], ch), (yh[0, 0, 1], cv), (yh[0, 0, 2], cd)]:
            np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)

    @pytest.mark.parametrize("wave", ["haar", "db2"])
    def test_same_bands_as_pytorch_wavelets(self, wave: str) -> None:
        """Checkpoints trained with pytorch_wavelets' DWTForward keep their meaning."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pytorch_wavelets import DWTForward

        x = torch.rand(2, 3, 20, 14)
        yl_ref, (yh_ref,) = DWTForward(J=1, wave=wave, mode="zero")(x)
        yl, yh = WaveletPool.split_bands(WaveletPool(wave)(x))
        assert torch.allclose(yl, yl_ref, atol=1e-5) and torch.allclose(yh, yh_ref, atol=1e-5)

    def test_bf16_autocast_matches_pywt_and_its_gradient_is_the_inverse(self) -> None:
        """Under bf16 autocast the convolution runs in bf16: bands within bf16 rounding of pywt, and the
        gradient (Haar is orthogonal: the inverse transform of the output gradient) reaches an fp32 input."""
        img = np.random.default_rng(1).random((2, 16, 16))
        x = torch.tensor(img, dtype=torch.float32)[None].requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = WaveletPool("haar")(x)
        assert y.dtype == torch.bfloat16
        yl, yh = WaveletPool.split_bands(y.float())
        ca, (ch, cv, cd) = pywt.dwt2(img[0], "haar", mode="zero")
        for ours, ref in [(yl[0, 0], ca), (yh[0, 0, 0], ch), (yh[0, 0, 1], cv), (yh[0, 0, 2], cd)]:
            np.testing.assert_allclose(ours.detach().numpy(), ref, atol=2e-2)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
        y.float().mul(g).sum().backward()
        assert x.grad is not None and x.grad.dtype == torch.float32
        gl, gh = WaveletPool.split_bands(g)
        expected = pywt.idwt2((gl[0, 0].numpy(), tuple(gh[0, 0, i].numpy() for i in range(3))), "haar", mode="zero")
        np.testing.assert_allclose(x.grad[0, 0].numpy(), expected, atol=3e-2)

    def test_bf16_autocast_forward_backward(self) -> None:
        pool = WaveletPool()
        x = torch.rand(2, 4, 16, 16).to(torch.bfloat16).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = pool(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert x.grad is not None and x.grad.dtype == torch.bfloat16


class TestFreezeUnet:
    def test_classifier_step_leaves_unet_bit_identical(self) -> None:
        cfg = PRESETS["tiny"]
        model = build_joint_model(cfg, seed=0)
        freeze_unet(model)
        model.train()
        assert model.unet_frozen and not any(m.training for m in model.unet.modules())
        assert model.classifier.training
        unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
        clf_before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        labels = torch.tensor([[1.0, 0.0, float("nan"), 1.0]] * 4)
        for _ in range(2):
            opt.zero_grad()
            x = _batch(cfg, n=4)
            mask_logits, logits = model(x, pixel_mm=_mm(x))
            assert not mask_logits.requires_grad
            weighted_bce(logits, labels).backward()
            opt.step()
        for k, v in model.unet.state_dict().items():
            assert torch.equal(v, unet_before[k]), k
        assert any(not torch.equal(v, clf_before[k]) for k, v in model.classifier.state_dict().items())

    def test_unfreeze(self) -> None:
        model = build_joint_model(PRESETS["tiny"], seed=0)
        freeze_unet(model)
        unfreeze_unet(model)
        model.train()
        assert model.unet.training and all(p.requires_grad for p in model.unet.parameters())


class TestHalves:
    def test_round_trip(self) -> None:
        cfg = PRESETS["tiny"]
        a, b = build_joint_model(cfg, seed=0), build_joint_model(cfg, seed=1)
        clf_b = half_state_dict(b, "classifier")
        sd = half_state_dict(a, "unet")
        assert all(k.startswith("unet.") for k in sd)
        load_half_state_dict(b, "unet", {k: v.numpy() for k, v in sd.items()})
        for k, v in half_state_dict(b, "unet").items():
            assert torch.equal(v, sd[k]), k
        for k, v in half_state_dict(b, "classifier").items():
            assert torch.equal(v, clf_b[k]), k

    def test_copy_not_view(self) -> None:
        model = build_joint_model(PRESETS["tiny"], seed=0)
        sd = half_state_dict(model, "classifier")
        with torch.no_grad():
            for p in model.classifier.parameters():
                p.add_(1.0)
        assert any(not torch.equal(v, model.state_dict()[k]) for k, v in sd.items())

    def test_mismatched_keys_rejected(self) -> None:
        model = build_joint_model(PRESETS["tiny"], seed=0)
        sd = half_state_dict(model, "unet")
        with pytest.raises(KeyError, match="classifier"):
            load_half_state_dict(model, "classifier", sd)
        with pytest.raises(KeyError, match="valid halves"):
            half_state_dict(model, "decoder")

    def test_norm_state_keys(self) -> None:
        model = build_joint_model(PRESETS["tiny"], seed=0)
        keys = norm_state_keys(model)
        assert keys <= set(model.state_dict())
        assert any(k.endswith("running_mean") for k in keys)
        assert not any(k.startswith("classifier.backbone.features.0.") for k in keys)  # a conv


def test_seeded_build_is_reproducible_and_keeps_global_rng() -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = build_joint_model(PRESETS["tiny"], seed=7), build_joint_model(PRESETS["tiny"], seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_to_input() -> None:
    batch = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    x = to_input(batch)
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))
    with pytest.raises(TypeError):
        to_input(batch.astype(np.float32))


class TestPresets:
    def test_unknown_preset_lists_valid_names(self) -> None:
        with pytest.raises(KeyError) as err:
            get_preset("huge")
        for name in PRESETS:
            assert name in str(err.value)

    def test_overrides_and_round_trip(self) -> None:
        cfg = get_preset("small", masked_input=True, norm="group")
        assert cfg.masked_input and cfg.norm == "group" and PRESETS["small"].norm == "batch"
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        assert isinstance(cfg.to_dict()["decoder_channels"], list)

    def test_invalid_values(self) -> None:
        with pytest.raises(KeyError, match="encoder_name"):
            get_preset("tiny", encoder="resnet18")
        with pytest.raises(ValueError, match="classifier"):
            get_preset("tiny", classifier="resnet")
        with pytest.raises(ValueError, match="decoder_channels"):
            get_preset("tiny", encoder_depth=4)
        with pytest.raises(ValueError, match="multiple of 32"):
            get_preset("tiny", image_size=100)
        with pytest.raises(KeyError, match="unknown"):
            ModelConfig.from_dict({"width": 1})


def test_every_batchnorm_tracks_its_statistics_at_momentum_0_1() -> None:
    from common.model import BATCHNORM_MOMENTUM
    from common.model import build_joint_model as build
    from common.presets import get_preset as preset

    model = build(preset("tiny"), seed=0)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and {m.momentum for m in bns} == {BATCHNORM_MOMENTUM} == {0.1}
