"""GoogLeNet and ShuffleNetV2 from torchvision, registered into timm (seed paper 001 baselines).

They are wrapped to look like timm models (``forward_features``/``forward_head``,
``reset_classifier``, ``pretrained_cfg``), so training, freezing and Grad-CAM treat them alike.
``pretrained=True`` asks torchvision for its ImageNet weights (network or torch hub cache).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torchvision
from timm.models import register_model
from torch import nn

from models.classifier_head import PooledLinearClassifier

__all__ = ["TorchvisionClassifier"]

_IMAGENET_CFG = {
    "input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875,
    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "num_classes": 1000,
    "classifier": "fc",
}


class TorchvisionClassifier(PooledLinearClassifier):
    """A torchvision feature extractor as ``features``, then pool → dropout → ``fc``."""

    def __init__(self, features: nn.Sequential, num_features: int, num_classes: int = 1000,
                 drop_rate: float = 0.0, global_pool: str = "avg", architecture: str = "") -> None:
        super().__init__()
        self.features = features
        self._init_head(num_features, num_classes, drop_rate, global_pool)
        self.pretrained_cfg = dict(_IMAGENET_CFG, architecture=architecture)
        self.default_cfg = self.pretrained_cfg

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Each child of ``features`` is one freezing group."""
        return {"stem": r"^features\.0\.", "blocks": r"^features\.(\d+)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _googlenet_features(pretrained: bool) -> tuple[nn.Sequential, int]:
    weights = "DEFAULT" if pretrained else None
    m = torchvision.models.googlenet(weights=weights, aux_logits=False, init_weights=not pretrained,
                                     transform_input=False)
    names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
             "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d", "inception4e",
             "maxpool4", "inception5a", "inception5b"]
    return nn.Sequential(*[getattr(m, n) for n in names]), 1024


def _shufflenet_features(pretrained: bool) -> tuple[nn.Sequential, int]:
    weights = "DEFAULT" if pretrained else None
    m = torchvision.models.shufflenet_v2_x1_0(weights=weights)
    return nn.Sequential(m.conv1, m.maxpool, m.stage2, m.stage3, m.stage4, m.conv5), 1024


def _create_torchvision(name: str, builder: Callable[[bool], tuple[nn.Sequential, int]],
                        pretrained: bool = False, num_classes: int = 1000, drop_rate: float = 0.0,
                        global_pool: str = "avg", **kwargs: Any) -> TorchvisionClassifier:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if kwargs:
        raise TypeError(f"{name} does not take {sorted(kwargs)}")
    features, num_features = builder(pretrained)
    return TorchvisionClassifier(features, num_features, num_classes, drop_rate, global_pool, name)


@register_model
def googlenet(pretrained: bool = False, **kwargs: Any) -> TorchvisionClassifier:
    """torchvision GoogLeNet (Inception v1) without auxiliary heads."""
    return _create_torchvision("googlenet", _googlenet_features, pretrained, **kwargs)


@register_model
def shufflenetv2_x1_0(pretrained: bool = False, **kwargs: Any) -> TorchvisionClassifier:
    """torchvision ShuffleNetV2 ×1.0."""
    return _create_torchvision("shufflenetv2_x1_0", _shufflenet_features, pretrained, **kwargs)
