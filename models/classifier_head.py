"""The classifier head the wrapped (non-timm) architectures share: global pool → dropout → ``fc``.

timm's own models carry this head on the model itself (``global_pool``, ``fc``,
``reset_classifier``, ``forward_head``). ``PooledLinearClassifier`` gives a wrapper the same
attributes and tensor names, so training, freezing, Grad-CAM and saved checkpoints treat it like
any timm model. A subclass defines ``forward_features`` and calls ``_init_head`` once its feature
layers exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from torch import nn

__all__ = ["PooledLinearClassifier"]


class PooledLinearClassifier(nn.Module):
    """Base of a wrapped architecture: its ``forward_features``, then pool → dropout → ``fc``."""

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float, global_pool: str) -> None:
        self.num_features = self.head_hidden_size = num_features
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = self._linear(num_classes)

    def _linear(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling) for ``num_classes`` outputs."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = self._linear(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
