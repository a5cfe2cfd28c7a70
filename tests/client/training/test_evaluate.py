"""``evaluate``: study scores by the one rule, study outputs for pooling, slice AUC on hematoma slices."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from client.data.cache import build_site_cache
from client.data.dataset import SliceDataset, brain_slices
from client.training.evaluate import evaluate, predict_dataset
from client.training.train import output_columns
from common.config import PreprocessConfig
from common.model import build_joint_model
from common.presets import get_preset
from common.study_metrics import StudyOutputs, sigmoid, study_scores_from_slices
from tests.helpers.data import write_site

TINY = get_preset("tiny", image_size=32)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("eval")
    labels = [[str(i % 2), str((i // 2) % 2), "0", str(int(i == 1)), str(int(i % 3 == 0))] for i in range(6)]
    site = write_site(root / "site-01", n_studies=6, shape=(4, 32, 32), labels=labels)
    for path in site.glob("masks/*/*.nii.gz"):  # hematoma on the first two slices only
        img = nib.load(str(path))
        mask = np.asarray(img.dataobj).copy()
        mask[2:] = 0
        nib.save(nib.Nifti1Image(mask, img.affine), str(path))
    cache, _ = build_site_cache(site, root / "cache", PreprocessConfig(size=32))
    ds = SliceDataset(cache, brain_slices(cache))
    model = build_joint_model(TINY, seed=0)
    return model, ds, evaluate(model, ds, "cpu", 8)


def test_study_scores_are_the_one_rule_on_slice_logits(scored) -> None:
    model, ds, m = scored
    pred = predict_dataset(model, ds, "cpu", 8)
    expected = study_scores_from_slices(pred.logits, ds.study_keys(), pred.pred_pixels, ds.min_mask_pixels)
    out = m["arrays"]["studies"]
    assert isinstance(out, StudyOutputs) and len(out) == m["n_studies"] == 6
    np.testing.assert_array_equal(out.studies, expected.studies)
    np.testing.assert_allclose(out.logits, expected.values)
    assert m["n_studies_fallback"] == int(expected.fallback.sum())
    c = out.names.index("hypodensity")
    assert m["auc_study/hypodensity"] == pytest.approx(roc_auc_score(out.labels[:, c], sigmoid(out.logits[:, c])))


def test_study_outputs_carry_labels_and_patient_keys_that_name_nobody(scored) -> None:
    model, ds, m = scored
    out = m["arrays"]["studies"]
    truth, cols = ds.study_labels(), output_columns(model)
    np.testing.assert_array_equal(out.labels, np.stack([truth[k][cols] for k in out.studies]))
    assert all(p.startswith("site-01/site-01#") for p in out.patients) and len(set(out.patients)) == 6
    assert not any("P00" in p for p in out.patients)
    assert set(out.sites) == {"site-01"}


def test_slice_auc_counts_only_slices_whose_reference_holds_hematoma(scored) -> None:
    _, ds, m = scored
    holds = m["arrays"]["slice_holds_hematoma"]
    assert 0 < holds.sum() < len(ds)
    y, s = m["arrays"]["slice_labels"][holds, 0], m["arrays"]["slice_scores"][holds, 0]
    assert m["auc_slice/hypodensity"] == pytest.approx(roc_auc_score(y, s))


def test_classifying_only_the_scored_slices_gives_the_full_forward_scores(scored) -> None:
    """The two-pass evaluation (segment all, classify the rule's slices) equals one full forward of
    every slice followed by the rule; the slices it leaves unscored are NaN, at most three per study."""
    import torch

    from common.model import to_input
    from common.study_metrics import STUDY_SLICES

    model, ds, m = scored
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds), shuffle=False)))
    with torch.inference_mode():
        mask_logits, logits = model.eval()(to_input(batch["image"]), pixel_mm=batch["pixel_mm"])
    pixels = (mask_logits[:, 0] > 0).reshape(len(ds), -1).sum(1).numpy()
    full = study_scores_from_slices(logits.numpy(), ds.study_keys(), pixels, ds.min_mask_pixels)
    np.testing.assert_allclose(m["arrays"]["studies"].logits, full.values, atol=1e-5)
    pred = predict_dataset(model, ds, "cpu", 8)
    scored_rows = ~np.isnan(pred.logits).any(axis=1)
    keys = ds.study_keys()
    for k in np.unique(keys):
        rows = keys == k
        holds = (pixels[rows] > ds.min_mask_pixels).sum()
        assert scored_rows[rows].sum() == (min(holds, STUDY_SLICES) if holds else rows.sum())
    np.testing.assert_allclose(pred.logits[scored_rows], logits.numpy()[scored_rows], atol=1e-5)
