"""Improved SE-ResNet50 of seed paper 003 (glomerulus classification).

Each residual block is the "small SE-ResNet module" the paper takes from Jiang et al. 2019:
the block's 3×3 convolutions are replaced by the asymmetric sequence 1×3, 3×1, 1×3, 3×1, followed
by squeeze-and-excitation with reduction 16. The paper's parameter arithmetic (its eq. 5-7) is
kept exactly: a block of width C costs 12·C² weights, against 17·C² for the bottleneck it replaces
and 18·C² for a basic block, so the network is smaller than ``seresnet50`` (see
``tests/test_models.py``). Stages follow ResNet50: (3, 4, 6, 3) blocks, widths 64/128/256/512.

Created like any timm model: ``timm.create_model("se_resnet50_factorized", num_classes=4)``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import create_attn
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import ResNet
from torch import nn

from models.resnet_variant import create_resnet_variant, resnet_variant_cfg

__all__ = ["FactorizedSEBlock"]


def _conv_bn_act(in_ch: int, out_ch: int, kernel: tuple[int, int], stride: tuple[int, int],
                 norm_layer: type[nn.Module], act_layer: type[nn.Module] | None) -> list[nn.Module]:
    pad = (kernel[0] // 2, kernel[1] // 2)
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=pad, bias=False),
        norm_layer(out_ch),
    ]
    if act_layer is not None:
        layers.append(act_layer(inplace=True))
    return layers


class FactorizedSEBlock(nn.Module):
    """Residual block: 1×3 → 3×1 → 1×3 → 3×1 convolutions, then SE (reduction 16)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        attn_layer: Any = "se",
        drop_path: nn.Module | None = None,
        **_: Any,  # timm passes cardinality, dilation, drop_block, ...: not used by this block
    ) -> None:
        super().__init__()
        # The stride is split over the pair so that each axis is reduced exactly once.
        self.conv = nn.Sequential(
            *_conv_bn_act(inplanes, planes, (1, 3), (1, stride), norm_layer, act_layer),
            *_conv_bn_act(planes, planes, (3, 1), (stride, 1), norm_layer, act_layer),
            *_conv_bn_act(planes, planes, (1, 3), (1, 1), norm_layer, act_layer),
            *_conv_bn_act(planes, planes, (3, 1), (1, 1), norm_layer, None),
        )
        self.se = create_attn(attn_layer, planes, rd_ratio=1 / 16)
        self.downsample = downsample
        self.drop_path = drop_path
        self.act = act_layer(inplace=True)

    def zero_init_last(self) -> None:
        """Start each block as the identity (timm calls this at init)."""
        nn.init.zeros_(self.conv[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.conv(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act(x + shortcut)


default_cfgs = generate_default_cfgs({"se_resnet50_factorized": resnet_variant_cfg()})


@register_model
def se_resnet50_factorized(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """SE-ResNet50 with 1×3/3×1 factorized blocks and SE reduction 16 (seed paper 003)."""
    model_args = dict(block=FactorizedSEBlock, layers=(3, 4, 6, 3), block_args=dict(attn_layer="se"))
    # No ImageNet weights exist for this block: the parts matching seresnet50 are copied from it.
    return create_resnet_variant("se_resnet50_factorized", "seresnet50", pretrained, **dict(model_args, **kwargs))
