"""``hemexp predict``: the one slice-to-study rule, the checkpoint's temperature and thresholds,
and a FedBN model completed by one site's normalisation layers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.inference.cli import hemexp_main
from client.inference.predict import findings, predict_study, run_prediction
from client.inference.site_norms import load_site_norms, with_site_norms
from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import PreprocessConfig
from common.model import build_joint_model, norm_state_keys
from common.presets import get_preset
from common.study_metrics import study_scores_from_slices
from tests.helpers.data import head_phantom, write_series

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 32


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("study") / "S1"
    write_series(folder, head_phantom((5, 48, 48), seed=3))
    return folder


@pytest.fixture(scope="module")
def model_cfg():
    return get_preset("tiny", image_size=SIZE)


def checkpoint(tmp: Path, cfg, meta: dict, name: str = "m.pt") -> Path:
    model = build_joint_model(cfg, seed=1)
    return save_checkpoint(tmp / name, model, cfg, PreprocessConfig(size=SIZE), meta)


def test_study_probability_is_the_one_rule_then_the_temperature(study, model_cfg, tmp_path):
    labels = list(model_cfg.output_names)
    plain = predict_study(study, load_checkpoint(checkpoint(tmp_path, model_cfg, {}, "plain.pt")))
    temp = {n: 2.0 + i for i, n in enumerate(labels)}
    th = {n: 0.3 + 0.1 * i for i, n in enumerate(labels)}
    calibrated = load_checkpoint(checkpoint(tmp_path, model_cfg, {"temperature": temp, "thresholds": th}, "cal.pt"))
    scaled = predict_study(study, calibrated)
    brain = plain.brain_slices
    pixels = (plain.mask_probability[brain] > 0.5).reshape(len(brain), -1).sum(1)
    rule = study_scores_from_slices(
        plain.slice_scores[brain], np.zeros(len(brain)), pixels, PreprocessConfig(size=SIZE).min_mask_pixels
    )
    np.testing.assert_allclose([plain.markers[n] for n in labels], rule.values[0], rtol=1e-5)
    logit = np.log(rule.values[0] / (1 - rule.values[0]))
    expected = 1 / (1 + np.exp(-logit / np.asarray([temp[n] for n in labels])))
    np.testing.assert_allclose([scaled.markers[n] for n in labels], expected, rtol=1e-4)
    calls = findings(scaled, calibrated)
    for n in labels:
        assert calls["thresholds"][n] == pytest.approx(th[n])
        assert calls["present"][n] == (scaled.markers[n] >= th[n])
    assert scaled.to_json()["operating_point"]["chosen_on"] == "validation"
    assert plain.to_json()["operating_point"]["chosen_on"] == "default"


def site_store(tmp: Path, cfg) -> Path:
    """What a FedBN site keeps: its own normalisation layers, one file per half."""
    site_model = build_joint_model(cfg, seed=7)
    for m in site_model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.running_mean.fill_(0.25)
    state = site_model.state_dict()
    keys = norm_state_keys(site_model)
    root = tmp / "federation" / "site-01" / "run"
    root.mkdir(parents=True)
    for half in ("unet", "classifier"):
        torch.save({k: state[k] for k in keys if k.startswith(half + ".")}, root / f"norm-{half}.pt")
    return root


def test_fedbn_model_needs_and_uses_a_sites_norms(study, model_cfg, tmp_path, capsys):
    path = checkpoint(tmp_path, model_cfg, {"method": "federated", "strategy": "fedbn", "stage": 2})
    with pytest.raises(ValueError, match="FedBN global model.*--site-norms"):
        run_prediction(study, path, tmp_path / "out")
    assert (
        hemexp_main(["predict", str(study), "--model", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
    )
    assert "FedBN" in capsys.readouterr().err
    store = site_store(tmp_path, model_cfg)
    done = with_site_norms(load_checkpoint(path), load_site_norms(store))
    bn = next(k for k in done.state_dict if k.endswith("running_mean"))
    assert torch.all(done.state_dict[bn] == 0.25)
    result = run_prediction(study, path, tmp_path / "out", site_norms=store)
    assert result["model"]["site_norms"] is True
    assert json.loads((tmp_path / "out" / "prediction.json").read_text())["markers"].keys() == set(done.labels)
    (store / "norm-classifier.pt").unlink()  # a stage-2 model without the classifier's layers
    with pytest.raises(ValueError, match="missing"):
        with_site_norms(load_checkpoint(path), load_site_norms(store))
    plain = checkpoint(tmp_path, model_cfg, {"method": "pooled"}, "pooled.pt")
    with pytest.raises(ValueError, match="not FedBN"):
        with_site_norms(load_checkpoint(plain), load_site_norms(store))
