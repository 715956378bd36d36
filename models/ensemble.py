"""Several trained copies of one architecture as one model: logits averaged.

``glom cv --ensemble`` bundles its k fold models this way into one checkpoint (one safetensors
file, keys ``members.<i>.<name>``; the sidecar's ``ensemble`` field says k), which loads, predicts
and explains like any checkpoint. Grad-CAM explains every member at its own target layer and
averages the maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["EnsembleClassifier"]


class EnsembleClassifier(nn.Module):
    """Mean of the members' logits (members share the class order)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.pretrained_cfg = getattr(first, "pretrained_cfg", {})
        self.num_classes = getattr(first, "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)
