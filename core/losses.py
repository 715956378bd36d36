"""Classification losses: cross-entropy (label smoothing, class weights) and focal loss.

All losses accept hard targets (class indices, shape (B,)) or soft targets (probabilities,
shape (B, C), as produced by MixUp).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import GlomError

__all__ = ["LossConfigError", "FocalLoss", "SoftTargetCrossEntropy", "create_loss", "class_weights_from_counts"]


class LossConfigError(GlomError, ValueError):
    """The loss settings do not fit the data (e.g. wrong number of class weights)."""


def _as_soft(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    if target.ndim == 1:
        target = F.one_hot(target.long(), num_classes).to(torch.float32)
    if smoothing > 0:
        target = target * (1.0 - smoothing) + smoothing / num_classes
    return target


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy with optional label smoothing and per-class weights, hard or soft targets."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight if weight is None else weight.float(), persistent=False)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        soft = _as_soft(target, logits.shape[1], self.label_smoothing)
        logp = F.log_softmax(logits.float(), dim=1)
        per_class = -soft * logp
        if self.weight is None:
            return per_class.sum(1).mean()
        # Same normalisation as torch's weighted cross-entropy: divide by the weight of the targets.
        per_class = per_class * self.weight
        return per_class.sum() / (soft * self.weight).sum()


class FocalLoss(nn.Module):
    """Focal loss ``-α_t (1 - p_t)^γ log p_t`` (Lin et al. 2017), per-class α (seed paper 001).

    With γ = 0 and no α it is exactly cross-entropy. ``alpha`` may be a sequence (one weight per
    class) or None.
    """

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | torch.Tensor | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if gamma < 0:
            raise LossConfigError(f"focal loss γ must be ≥ 0, got {gamma}")
        self.gamma = gamma
        alpha_t = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        self.register_buffer("alpha", alpha_t, persistent=False)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        if self.alpha is not None and self.alpha.numel() != num_classes:
            raise LossConfigError(f"focal α has {self.alpha.numel()} values for {num_classes} classes")
        soft = _as_soft(target, num_classes, self.label_smoothing)
        logp = F.log_softmax(logits.float(), dim=1)
        focal = (1.0 - logp.exp()).pow(self.gamma) if self.gamma else 1.0
        per_class = -soft * focal * logp
        if self.alpha is not None:
            per_class = per_class * self.alpha
        return per_class.sum(1).mean()


def class_weights_from_counts(counts: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (a class with no samples gets weight 0)."""
    c = torch.as_tensor(counts, dtype=torch.float32)
    w = torch.where(c > 0, c.sum() / (len(c) * c.clamp(min=1)), torch.zeros_like(c))
    return w / w[c > 0].mean()


def create_loss(name: str, num_classes: int, label_smoothing: float = 0.0,
                class_weights: Sequence[float] | torch.Tensor | None = None,
                focal_gamma: float = 2.0, focal_alpha: Sequence[float] | None = None) -> nn.Module:
    """Build a loss by name: ``cross_entropy`` or ``focal``."""
    if class_weights is not None and len(class_weights) != num_classes:
        raise LossConfigError(f"{len(class_weights)} class weights given for {num_classes} classes")
    if name in ("cross_entropy", "ce"):
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        return SoftTargetCrossEntropy(weight, label_smoothing)
    if name == "focal":
        alpha = focal_alpha if focal_alpha is not None else class_weights
        if alpha is not None and len(alpha) != num_classes:
            raise LossConfigError(f"focal α has {len(alpha)} values for {num_classes} classes")
        return FocalLoss(focal_gamma, alpha, label_smoothing)
    raise LossConfigError(f"unknown loss {name!r}: use cross_entropy or focal")
