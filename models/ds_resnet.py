"""DS-ResNet50 of seed paper 001 (ISIC 2017 skin lesions).

The bottleneck's 3×3 becomes a dual-scale dilated module: a 3×3 convolution with dilation 1
cascaded into a depthwise 3×3 with dilation 3; the two outputs are fused by addition, so the
block sees receptive fields of 3 and 9 pixels at the same resolution. Parameter-free SimAM
attention sits before and after the module (the paper's table 1). Tensor names follow timm's
``resnet50`` (``conv1``/``conv2``/``conv3``), so its ImageNet weights initialise all but the
dilated depthwise branch.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import ResNet
from torch import nn

from models.resnet_variant import create_resnet_variant, resnet_variant_cfg

__all__ = ["SimAM", "DualScaleBottleneck"]


class SimAM(nn.Module):
    """Parameter-free attention (Yang et al. 2021): weights each neuron by its inverse energy."""

    def __init__(self, e_lambda: float = 1e-4) -> None:
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2] * x.shape[3] - 1
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
        v = d.sum(dim=(2, 3), keepdim=True) / max(n, 1)
        e_inv = d / (4 * (v + self.e_lambda)) + 0.5
        return x * torch.sigmoid(e_inv)


class DualScaleBottleneck(nn.Module):
    """1×1 → SimAM → [3×3 d=1 → depthwise 3×3 d=3, summed] → SimAM → 1×1, plus shortcut."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        drop_path: nn.Module | None = None,
        dilation_rates: tuple[int, int] = (1, 3),
        **_: Any,  # timm passes cardinality, base_width, drop_block, ...: not used by this block
    ) -> None:
        super().__init__()
        width = planes
        outplanes = planes * self.expansion
        r1, r2 = dilation_rates
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.act1 = act_layer(inplace=True)
        self.attn1 = SimAM()
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=r1, dilation=r1, bias=False)
        self.bn2 = norm_layer(width)
        self.act2 = act_layer(inplace=True)
        self.conv2_dilated = nn.Conv2d(width, width, 3, padding=r2, dilation=r2, groups=width, bias=False)
        self.bn2_dilated = norm_layer(width)
        self.act2_dilated = act_layer(inplace=True)
        self.attn2 = SimAM()
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        """Start each block as the identity (timm calls this at init)."""
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.attn1(self.act1(self.bn1(self.conv1(x))))
        near = self.act2(self.bn2(self.conv2(x)))
        far = self.act2_dilated(self.bn2_dilated(self.conv2_dilated(near)))
        x = self.attn2(near + far)
        x = self.bn3(self.conv3(x))
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act3(x + shortcut)


default_cfgs = generate_default_cfgs({"ds_resnet50": resnet_variant_cfg()})


@register_model
def ds_resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet50 with dual-scale dilated bottlenecks (rates 1, 3) and SimAM (seed paper 001)."""
    model_args = dict(block=DualScaleBottleneck, layers=(3, 4, 6, 3))
    return create_resnet_variant("ds_resnet50", "resnet50", pretrained, **dict(model_args, **kwargs))
