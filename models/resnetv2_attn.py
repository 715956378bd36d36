"""ResNet50V2 + self-attention of seed paper 002 (SIPaKMeD cervical cells).

The backbone's last feature map (B, C, H, W) is read as H·W tokens; single-head scaled
dot-product self-attention projects them to ``attn_dim`` (256 in the paper), the result is
concatenated with the feature map along channels, then pooled and classified:
``Input → ResNet50V2 → [features ⊕ self-attention] → GAP → Dropout → Linear``.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from models.classifier_head import PooledLinearClassifier

__all__ = ["SpatialSelfAttention", "BackboneWithSelfAttention"]


class SpatialSelfAttention(nn.Module):
    """Self-attention over the positions of a feature map; returns (B, attn_dim, H, W)."""

    def __init__(self, in_chs: int, attn_dim: int = 256) -> None:
        super().__init__()
        self.q = nn.Linear(in_chs, attn_dim)
        self.k = nn.Linear(in_chs, attn_dim)
        self.v = nn.Linear(in_chs, attn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        out = F.scaled_dot_product_attention(self.q(tokens), self.k(tokens), self.v(tokens))
        return out.transpose(1, 2).reshape(b, -1, h, w)


class BackboneWithSelfAttention(PooledLinearClassifier):
    """A timm backbone whose last feature map is concatenated with its self-attention."""

    def __init__(self, backbone: nn.Module, num_classes: int = 1000, attn_dim: int = 256,
                 drop_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__()
        self.backbone = backbone
        self.attn = SpatialSelfAttention(backbone.num_features, attn_dim)
        self._init_head(backbone.num_features + attn_dim, num_classes, drop_rate, global_pool)
        self.pretrained_cfg = dict(backbone.pretrained_cfg, classifier="fc")
        self.default_cfg = self.pretrained_cfg

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for freezing: the backbone's stem and stages, then the attention."""
        inner = self.backbone.group_matcher(coarse=coarse)
        return {k: (f"^backbone\\.{v.lstrip('^')}" if isinstance(v, str) else
                    [(f"^backbone\\.{p.lstrip('^')}", s) for p, s in v]) for k, v in inner.items()}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone.forward_features(x)
        return torch.cat([x, self.attn(x)], dim=1)


def _create_with_attention(backbone_name: str, pretrained: bool = False, num_classes: int = 1000,
                           drop_rate: float = 0.0, attn_dim: int = 256, global_pool: str = "avg",
                           **kwargs: Any) -> BackboneWithSelfAttention:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    backbone = timm.create_model(backbone_name, pretrained=pretrained, num_classes=0,
                                 global_pool="", **kwargs)
    return BackboneWithSelfAttention(backbone, num_classes, attn_dim, drop_rate, global_pool)


@register_model
def resnetv2_50_attn(pretrained: bool = False, **kwargs: Any) -> BackboneWithSelfAttention:
    """ResNet50V2 with self-attention over its last feature map, concatenated (seed paper 002)."""
    return _create_with_attention("resnetv2_50", pretrained, **kwargs)
