"""Losses against independent numpy formulas; NaN labels are masked out exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.losses import dice_loss, label_counts, pos_weight_from_counts, segmentation_loss, weighted_bce

NAN = float("nan")


def _np_weighted_bce(logits: np.ndarray, labels: np.ndarray, w: np.ndarray) -> float:
    """Paper formula 2, written independently: mean over entries of the weighted log loss."""
    p = 1.0 / (1.0 + np.exp(-logits))
    terms = -(w * labels * np.log(p) + (1 - labels) * np.log(1 - p))
    return float(terms.mean())


@pytest.fixture
def case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4))
    labels = (rng.random((6, 4)) > 0.6).astype(np.float64)
    w = np.array([3.0, 0.5, 1.0, 7.0])
    return logits, labels, w


def test_weighted_bce_matches_numpy(case) -> None:
    logits, labels, w = case
    loss = weighted_bce(torch.tensor(logits), torch.tensor(labels), torch.tensor(w))
    assert loss.item() == pytest.approx(_np_weighted_bce(logits, labels, w), rel=1e-5)


def test_weighted_bce_without_weights_is_plain_bce(case) -> None:
    logits, labels, _ = case
    loss = weighted_bce(torch.tensor(logits), torch.tensor(labels))
    assert loss.item() == pytest.approx(_np_weighted_bce(logits, labels, np.ones(4)), rel=1e-5)


def test_nan_labels_change_nothing(case) -> None:
    logits, labels, w = case
    labels = labels.copy()
    holes = np.zeros_like(labels, dtype=bool)
    holes[0, 1] = holes[3, 0] = holes[5, 3] = True
    labels[holes] = np.nan
    x = torch.tensor(logits, requires_grad=True)
    loss = weighted_bce(x, torch.tensor(labels), torch.tensor(w))
    known = ~holes
    w_full = np.broadcast_to(w, labels.shape)
    expected = _np_weighted_bce(logits[known], labels[known], w_full[known])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert (x.grad[torch.tensor(holes)] == 0).all()
    assert (x.grad[torch.tensor(known)] != 0).all()


def test_all_nan_gives_zero_loss_and_zero_gradient() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    loss = weighted_bce(x, torch.full((3, 4), NAN), torch.ones(4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(3, 4))


def test_weighted_bce_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        weighted_bce(torch.zeros(2, 4), torch.zeros(2, 3))


def test_pos_weight_from_counts() -> None:
    w = pos_weight_from_counts([10, 0, 5, 3], [90, 50, 0, 3])
    assert w.dtype == torch.float32
    assert w.tolist() == [9.0, 1.0, 1.0, 1.0]  # no positives or no negatives: plain BCE
    assert pos_weight_from_counts([1, 4], [99, 4], max_weight=20.0).tolist() == [20.0, 1.0]
    with pytest.raises(ValueError):
        pos_weight_from_counts([1, 2], [1])
    with pytest.raises(ValueError):
        pos_weight_from_counts([-1], [1])


def test_label_counts_ignores_nan() -> None:
    labels = np.array([[1, 0, NAN], [0, 0, NAN], [1, NAN, NAN], [0, 1, NAN]])
    pos, neg = label_counts(labels)
    assert pos.tolist() == [2, 1, 0] and neg.tolist() == [2, 2, 0]
    with pytest.raises(ValueError):
        label_counts(np.array([[0.5]]))


def test_dice_loss_by_hand() -> None:
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # [B, H, W] is accepted too
    p = torch.sigmoid(logits).flatten()
    t = target.flatten()
    expected = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert dice_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    assert segmentation_loss(logits, target).item() == pytest.approx((expected + bce).item(), rel=1e-6)


def test_dice_loss_limits() -> None:
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:5, 2:5] = 1
    assert dice_loss(torch.where(target > 0, 50.0, -50.0), target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(torch.full((2, 1, 8, 8), -50.0), torch.zeros(2, 1, 8, 8)).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(torch.where(target > 0, -50.0, 50.0), target).item() > 0.99
