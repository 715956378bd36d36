"""Preprocessing and augmentation built from the config (torchvision ``transforms.v2``).

Inputs are HWC uint8 RGB arrays (after optional stain normalisation); outputs are float CHW
tensors. The preprocessing part (size, scaling, mean/std, interpolation) is a plain dict,
:func:`resolve_preprocess`, that travels in the checkpoint sidecar; :func:`build_eval_transform`
rebuilds inference transforms from it alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms.v2 as T
from torch import nn

from core.config import AugmentConfig, PreprocessConfig

__all__ = ["resolve_preprocess", "build_train_transform", "build_eval_transform", "RandomRot90",
           "HEDJitter", "mixup_batch", "TransformError"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# skimage.color.hed_from_rgb / rgb_from_hed (Ruifrok & Johnston stain vectors).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


class TransformError(ValueError):
    """Preprocessing settings that cannot work (unknown scaling, bad sizes)."""


def resolve_preprocess(model: nn.Module, cfg: PreprocessConfig) -> dict[str, Any]:
    """Preprocessing for ``model``: its own input size unless the config sets one, and the scaling."""
    from timm.data import resolve_data_config

    data_cfg = resolve_data_config(model=model)
    size = cfg.input_size or int(data_cfg["input_size"][-1])
    if cfg.scaling == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif cfg.scaling == "model":
        mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    elif cfg.scaling == "unit":
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        raise TransformError(f"scaling must be imagenet, model or unit, not {cfg.scaling!r}")
    return {"input_size": [3, size, size], "mean": list(mean), "std": list(std),
            "scaling": cfg.scaling, "interpolation": cfg.interpolation}


def _interp(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name)
    except ValueError:
        raise TransformError(f"unknown interpolation {name!r}") from None


class RandomRot90(nn.Module):
    """Rotate by a uniformly drawn multiple of 90° (0, 90, 180, 270)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()).item())
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


class HEDJitter(nn.Module):
    """Perturb haematoxylin/eosin/DAB concentrations: ``c·α + β``, α ∈ 1±σ, β ∈ ±σ (float [0,1] input)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        od = -torch.log(x.clamp(min=1e-6))  # (3, H, W)
        hed = torch.einsum("chw,cd->dhw", od, _HED_FROM_RGB.to(x.dtype))
        alpha = 1 + (torch.rand(3, 1, 1) * 2 - 1) * self.sigma
        beta = (torch.rand(3, 1, 1) * 2 - 1) * self.sigma
        hed = hed * alpha + beta
        od = torch.einsum("dhw,dc->chw", hed, _RGB_FROM_HED.to(x.dtype))
        return torch.exp(-od).clamp(0, 1)


class _AddGaussianNoise(nn.Module):
    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + torch.randn_like(x) * self.sigma).clamp(0, 1)


def _tail(pre: dict[str, Any]) -> list[nn.Module]:
    out: list[nn.Module] = []
    if pre["scaling"] != "unit":
        out.append(T.Normalize(pre["mean"], pre["std"]))
    return out


def build_eval_transform(pre: dict[str, Any]) -> T.Compose:
    """Resize the whole crop to the model's input (no centre crop: the glomerulus fills the crop)."""
    size = int(pre["input_size"][-1])
    return T.Compose([
        T.ToImage(),
        T.Resize((size, size), interpolation=_interp(pre.get("interpolation", "bilinear")), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        *_tail(pre),
    ])


def build_train_transform(pre: dict[str, Any], aug: AugmentConfig) -> T.Compose:
    """Geometric then colour augmentation, then scaling; each step only when its setting is on."""
    size = int(pre["input_size"][-1])
    interp = _interp(pre.get("interpolation", "bilinear"))
    steps: list[nn.Module] = [T.ToImage()]
    if aug.crop_scale > 0:
        steps.append(T.RandomResizedCrop((size, size), scale=(aug.crop_scale, 1.0), interpolation=interp,
                                         antialias=True))
    else:
        steps.append(T.Resize((size, size), interpolation=interp, antialias=True))
    if aug.rotate_degrees > 0:
        # Rotated corners are filled with white, like empty glass.
        steps.append(T.RandomRotation(aug.rotate_degrees, interpolation=T.InterpolationMode.BILINEAR,
                                      fill=255))
    if aug.rotate90:
        steps.append(RandomRot90())
    if aug.hflip > 0:
        steps.append(T.RandomHorizontalFlip(aug.hflip))
    if aug.vflip > 0:
        steps.append(T.RandomVerticalFlip(aug.vflip))
    if aug.color_jitter > 0 or aug.hue_jitter > 0:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=aug.hue_jitter))
    steps.append(T.ToDtype(torch.float32, scale=True))
    if aug.hed_jitter > 0:
        steps.append(HEDJitter(aug.hed_jitter))
    if aug.gaussian_noise > 0:
        steps.append(_AddGaussianNoise(aug.gaussian_noise))
    steps.extend(_tail(pre))
    return T.Compose(steps)


def mixup_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (Zhang et al. 2018): blend the batch with a shuffled copy, λ ~ Beta(α, α).

    Returns the mixed images and soft targets (B, num_classes). Draws from torch's global
    generator, so a seeded run mixes the same way every time.
    """
    soft = torch.nn.functional.one_hot(y.long(), num_classes).to(torch.float32)
    if alpha <= 0 or x.shape[0] < 2:
        return x, soft
    a = torch.tensor(float(alpha))
    lam = float(torch.distributions.Beta(a, a).sample())
    perm = torch.randperm(x.shape[0]).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * soft + (1 - lam) * soft[perm]
