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
from core.errors import GlomError

__all__ = ["resolve_preprocess", "build_train_transform", "build_eval_transform", "RandomRot90",
           "HEDJitter", "RandStainNA", "lab_statistics", "rgb_to_lab", "lab_to_rgb", "dihedral_views",
           "tta_logits", "mixup_batch", "TransformError"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# skimage.color.hed_from_rgb / rgb_from_hed (Ruifrok & Johnston stain vectors).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


class TransformError(GlomError, ValueError):
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


# --- RandStainNA-style re-staining in CIE LAB (Shen et al., MICCAI 2022) --------------------------

_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (..., 3, H, W) → CIE LAB (D65); L in [0, 100]."""
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = torch.einsum("ij,...jhw->...ihw", _RGB_TO_XYZ.to(x.dtype), lin) / _WHITE.to(x.dtype)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-8) ** (1 / 3), 7.787 * xyz + 16 / 116)
    L = 116 * f[..., 1, :, :] - 16
    a = 500 * (f[..., 0, :, :] - f[..., 1, :, :])
    b = 200 * (f[..., 1, :, :] - f[..., 2, :, :])
    return torch.stack([L, a, b], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab`, clamped to [0, 1]."""
    L, a, b = lab[..., 0, :, :], lab[..., 1, :, :], lab[..., 2, :, :]
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=-3)
    xyz = torch.where(f > 0.206893, f ** 3, (f - 16 / 116) / 7.787) * _WHITE.to(lab.dtype)[:, None, None]
    lin = torch.einsum("ij,...jhw->...ihw", _XYZ_TO_RGB.to(lab.dtype), xyz).clamp(0, 1)
    return torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=1e-8) ** (1 / 2.4) - 0.055, 12.92 * lin).clamp(0, 1)


def lab_statistics(images: list[torch.Tensor]) -> dict[str, list[float]]:
    """Mean and spread, over images, of each image's per-channel LAB mean and std.

    ``images`` are float [0, 1] (3, H, W) tensors (a few dozen training crops are enough). The
    result is the "stain template" distribution RandStainNA draws targets from.
    """
    stats = []
    for x in images:
        lab = rgb_to_lab(x).flatten(1)
        stats.append(torch.cat([lab.mean(1), lab.std(1)]))
    t = torch.stack(stats)
    return {"mean": t.mean(0).tolist(), "std": t.std(0).tolist() if len(stats) > 1 else [0.0] * 6}


class RandStainNA(nn.Module):
    """Re-stain towards a random "virtual template": each image's LAB mean/std per channel is moved
    to values drawn from the training set's distribution (:func:`lab_statistics`), spread scaled by
    ``std_scale``. With probability ``p``; float [0, 1] (3, H, W) input and output.
    """

    def __init__(self, stats: dict[str, list[float]], p: float = 0.5, std_scale: float = 1.0) -> None:
        super().__init__()
        self.mu = torch.tensor(stats["mean"], dtype=torch.float32)
        self.sigma = torch.tensor(stats["std"], dtype=torch.float32) * std_scale
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()).item() >= self.p:
            return x
        lab = rgb_to_lab(x.float())
        flat = lab.flatten(1)
        mean, std = flat.mean(1), flat.std(1).clamp(min=1e-3)
        target = self.mu + torch.randn(6) * self.sigma
        t_mean, t_std = target[:3], target[3:].clamp(min=1e-3)
        lab = (lab - mean[:, None, None]) / std[:, None, None] * t_std[:, None, None] + t_mean[:, None, None]
        return lab_to_rgb(lab).to(x.dtype)


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


def build_train_transform(pre: dict[str, Any], aug: AugmentConfig,
                          stain_stats: dict[str, list[float]] | None = None) -> T.Compose:
    """Geometric then colour augmentation, then scaling; each step only when its setting is on.

    ``stain_stats`` (:func:`lab_statistics` of training crops) is needed when ``aug.randstain`` > 0.
    """
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
    if aug.jpeg > 0:
        steps.append(T.RandomApply([T.JPEG(quality=(30, 90))], p=aug.jpeg))
    steps.append(T.ToDtype(torch.float32, scale=True))
    if aug.randstain > 0:
        if not stain_stats:
            raise TransformError("augment.randstain needs LAB statistics of the training crops")
        steps.append(RandStainNA(stain_stats, aug.randstain, aug.randstain_std))
    if aug.hed_jitter > 0:
        steps.append(HEDJitter(aug.hed_jitter))
    if aug.blur > 0:
        steps.append(T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 1.5))], p=aug.blur))
    if aug.grayscale > 0:
        steps.append(T.RandomGrayscale(aug.grayscale))
    if aug.gaussian_noise > 0:
        steps.append(_AddGaussianNoise(aug.gaussian_noise))
    steps.extend(_tail(pre))
    return T.Compose(steps)


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral views of a batch (N, C, H, W): 4 rotations, each also mirrored."""
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        views += [r, torch.flip(r, dims=(-1,))]
    return views


def tta_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean logits over the 8 dihedral views (a glomerulus has no up or left)."""
    return torch.stack([model(v) for v in dihedral_views(x)]).mean(0)


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
