"""Freezing part of a backbone: by fraction of its parameters, by stages, or by conv layers.

The classifier (``model.get_classifier()``) is never frozen. Frozen normalisation layers should
also stop updating their running statistics: call :func:`set_frozen_norm_eval` after
``model.train()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn

from annotation_db.errors import GlomError

log = logging.getLogger(__name__)

__all__ = ["FreezeError", "FreezeReport", "freeze_backbone", "unfreeze_all", "set_frozen_norm_eval"]


class FreezeError(GlomError, ValueError):
    """The freezing request cannot be applied to this model."""


@dataclass(frozen=True)
class FreezeReport:
    """How much of the backbone is frozen (counts are scalar parameters, not tensors)."""

    frozen_params: int
    backbone_params: int

    @property
    def fraction(self) -> float:
        return self.frozen_params / max(self.backbone_params, 1)


def _backbone_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()
    return [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]


def _stage_cutoff(model: nn.Module, names: list[str], stages: int) -> set[str]:
    if not hasattr(model, "group_matcher"):
        raise FreezeError(f"{type(model).__name__} has no group_matcher: freeze by fraction instead")
    groups = group_parameters(model, model.group_matcher(coarse=True))
    ordered = [groups[k] for k in sorted(groups)]
    body = [g for g in ordered if set(g) & set(names)]
    # The last group of a timm model is its head; freezing never reaches it.
    last_backbone = len(body) - 1 if set(body[-1]) - set(names) else len(body)
    if stages > last_backbone - 1:
        raise FreezeError(f"the model has {last_backbone - 1} stages after its stem; asked to freeze {stages}")
    selected: set[str] = set()
    for g in body[: stages + 1]:
        selected.update(g)
    return selected & set(names)


def freeze_backbone(
    model: nn.Module,
    fraction: float | None = None,
    stages: int | None = None,
    conv_layers: int | None = None,
) -> FreezeReport:
    """Freeze the leading part of the backbone; exactly one of the three selectors is used.

    - ``fraction`` in [0, 1]: the first tensors (in module order) holding that share of the
      backbone's parameters (0, 0.25, 0.75, 1 in seed paper 003).
    - ``stages``: the stem plus the first ``stages`` stages (timm's coarse ``group_matcher``).
    - ``conv_layers``: the first ``conv_layers`` convolutions and everything before them
      (seed paper 000 freezes the first 5).
    """
    chosen = [s is not None for s in (fraction, stages, conv_layers)]
    if sum(chosen) != 1:
        raise FreezeError("give exactly one of fraction, stages or conv_layers")
    named = _backbone_named_parameters(model)
    names = [n for n, _ in named]
    total = sum(p.numel() for _, p in named)
    to_freeze: set[str] = set()
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise FreezeError(f"freeze fraction must be within [0, 1], got {fraction}")
        budget, seen = fraction * total, 0
        for n, p in named:
            if seen >= budget or fraction == 0.0:
                break
            to_freeze.add(n)
            seen += p.numel()
    elif stages is not None:
        if stages > 0:
            to_freeze = _stage_cutoff(model, names, stages)
    else:
        assert conv_layers is not None
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if conv_layers > 0:
            cut = len(names)
            if conv_layers < len(convs):
                first_unfrozen = id(convs[conv_layers].weight)
                cut = next(i for i, (_, p) in enumerate(named) if id(p) == first_unfrozen)
            to_freeze = set(names[:cut])
    frozen = 0
    for n, p in named:
        p.requires_grad_(n not in to_freeze)
        frozen += p.numel() if n in to_freeze else 0
    report = FreezeReport(frozen, total)
    log.info("froze %.1f%% of the backbone (%d of %d parameters)", 100 * report.fraction, frozen, total)
    return report


def unfreeze_all(model: nn.Module) -> None:
    """Make every parameter trainable again (second phase of two-phase fine-tuning)."""
    for p in model.parameters():
        p.requires_grad_(True)


def set_frozen_norm_eval(model: nn.Module) -> None:
    """Put normalisation layers whose parameters are all frozen into eval mode (fixed statistics)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
