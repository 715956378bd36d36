"""One builder for the seed papers' ResNet variants: timm's ``ResNet`` with a custom block.

``ds_resnet50`` (seed 001) and ``se_resnet50_factorized`` (seed 003) differ only in their block
and in the stock timm model whose pretrained tensors fit them. No ImageNet weights exist for
their blocks: ``pretrained=True`` builds the network from random weights, then copies every
tensor that matches by name and shape from ``init_from`` (see ``models/partial_init.py``).
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg
from timm.models.resnet import ResNet

from models.partial_init import init_from_timm_model

__all__ = ["resnet_variant_cfg", "create_resnet_variant"]


def resnet_variant_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm's pretrained_cfg of a ResNet50-shaped variant (ImageNet preprocessing), plus ``kwargs``."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "first_conv": "conv1", "classifier": "fc", **kwargs,
    }


def create_resnet_variant(variant: str, init_from: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Build the registered ``variant`` (``kwargs`` name its ``block`` and ``layers``).

    With ``pretrained``, tensors matching ``init_from`` (a timm model with pretrained weights) by
    name and shape are copied from it; timm's errors when those weights cannot be had propagate.
    """
    for key in ("pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = build_model_with_cfg(ResNet, variant, pretrained=False, **kwargs)
    if pretrained:
        init_from_timm_model(model, init_from)
    return model
