"""Choosing DP-SGD's clipping bound from public data (client/training/clip_tuning.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.training.clip_tuning import NormSummary, patient_grad_norms, run_config_line, summarize
from tests.helpers.dp import FakeSlices, dp_model, half_of, slice_gradients

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("stage", [1, 2])
def test_patient_norms_match_summed_slice_gradients_by_hand(stage):
    """Patients of 3, 2 and 1 slices, 2 slices per chunk (patient 0 spans two chunks): each norm is that of
    the sum of the patient's one-slice-at-a-time gradients, what GroupedDPOptimizer clips; a per-slice
    mean instead of the sum would be 3x and 2x too small for the first two."""
    model, ds = dp_model(), FakeSlices(6)
    groups = np.array([0, 0, 0, 1, 1, 2])
    norms = patient_grad_norms(model, ds, groups, stage, chunk=2)
    assert not model.training and (stage == 1) == all(p.requires_grad for p in model.unet.parameters())
    params = [p for p in half_of(model, stage).parameters() if p.requires_grad]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=6)))
    sums = [[torch.zeros_like(p, dtype=torch.float64) for p in params] for _ in range(3)]
    for i, grads in enumerate(slice_gradients(model, batch, stage, params)):
        for acc, g in zip(sums[groups[i]], grads):
            acc += g.double()
    expected = [float(torch.sqrt(sum((g**2).sum() for g in patient))) for patient in sums]
    assert norms.shape == (3,)
    assert norms == pytest.approx(expected, rel=1e-2)
    with pytest.raises(ValueError, match="5 patient labels for 6 slices"):
        patient_grad_norms(model, ds, groups[:5], stage)


def test_summary_quantiles_and_the_recommended_bounds():
    one = summarize(np.array([5.0, 1.0, 4.0, 2.0, 3.0]), 1)
    assert one.patients == 5
    assert one.quantiles == pytest.approx({0.1: 1.4, 0.25: 2.0, 0.5: 3.0, 0.75: 4.0, 0.9: 4.6})
    assert one.recommended == 3.0
    assert one.describe() == "stage 1: 5 patients; norms p10 1.4, p25 2, p50 3, p75 4, p90 4.6; recommended C 3"
    two = NormSummary(2, 2, {0.5: 0.0123})
    assert run_config_line({1: one, 2: two}) == "privacy.max-grad-norm=3 privacy.max-grad-norm-stage2=0.0123"
    assert run_config_line({2: two}) == "privacy.max-grad-norm-stage2=0.0123"
    with pytest.raises(ValueError, match="stage 2: no patient with a usable slice"):
        summarize(np.zeros(0), 2)
