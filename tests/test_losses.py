"""Losses: focal loss reduces to cross-entropy at γ=0; weights and smoothing match torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.losses import (FocalLoss, LossConfigError, SoftTargetCrossEntropy, class_weights_from_counts,
                         create_loss)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, generator=g) * 3, torch.randint(0, 4, (16,), generator=g)


def test_focal_equals_cross_entropy_at_gamma_zero(batch):
    logits, y = batch
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, y), F.cross_entropy(logits, y), atol=1e-6)
    soft = torch.softmax(torch.randn(16, 4), 1)
    ce_soft = -(soft * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, soft), ce_soft, atol=1e-6)


def test_focal_down_weights_easy_examples(batch):
    logits, y = batch
    easy = F.one_hot(y, 4).float() * 10  # confidently right
    ratio_easy = FocalLoss(gamma=2.0)(easy, y) / F.cross_entropy(easy, y)
    ratio_all = FocalLoss(gamma=2.0)(logits, y) / F.cross_entropy(logits, y)
    assert ratio_easy < 1e-3 < ratio_all < 1


def test_focal_alpha_weights_each_class(batch):
    logits, y = batch
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4])
    expected = (alpha[y] * F.cross_entropy(logits, y, reduction="none")).mean()
    assert torch.allclose(FocalLoss(gamma=0.0, alpha=alpha)(logits, y), expected, atol=1e-6)


def test_cross_entropy_matches_torch_with_weights_and_smoothing(batch):
    logits, y = batch
    w = torch.tensor([1.0, 2.0, 0.5, 1.5])
    assert torch.allclose(SoftTargetCrossEntropy(w)(logits, y), F.cross_entropy(logits, y, weight=w), atol=1e-6)
    assert torch.allclose(SoftTargetCrossEntropy(label_smoothing=0.1)(logits, y),
                          F.cross_entropy(logits, y, label_smoothing=0.1), atol=1e-6)


def test_balanced_class_weights():
    w = class_weights_from_counts([100, 25, 0])
    assert w[2] == 0
    assert torch.isclose(w[1] / w[0], torch.tensor(4.0))
    assert torch.isclose(w[:2].mean(), torch.tensor(1.0))


def test_create_loss_checks_lengths():
    assert isinstance(create_loss("focal", 3, focal_alpha=[0.2, 0.3, 0.5]), FocalLoss)
    with pytest.raises(LossConfigError):
        create_loss("focal", 3, focal_alpha=[0.5, 0.5])
    with pytest.raises(LossConfigError):
        create_loss("cross_entropy", 3, class_weights=[1.0])
    with pytest.raises(LossConfigError):
        create_loss("hinge", 3)
