"""Initialising a custom architecture from a timm model's pretrained weights where they fit."""

from __future__ import annotations

import logging

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)


def copy_matching_tensors(model: nn.Module, source: dict[str, torch.Tensor]) -> int:
    """Copy every tensor of ``source`` whose name and shape match one of ``model``; return the count."""
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return len(matched)


def init_from_timm_model(model: nn.Module, source_name: str) -> int:
    """Load ``source_name``'s pretrained timm weights into the matching tensors of ``model``.

    Needs the weights (hub or cache); raises whatever timm raises when they cannot be had, so the
    caller can turn it into an actionable message.
    """
    source = timm.create_model(source_name, pretrained=True)
    n = copy_matching_tensors(model, source.state_dict())
    log.info("initialised %d of %d tensors from %s", n, len(model.state_dict()), source_name)
    return n
