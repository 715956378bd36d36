"""Class activation maps for the classifiers the training core builds (pytorch-grad-cam).

    with open_cam(model, "resnet18", "gradcam") as cam:
        heat = cam(batch, target_class=2)           # (N, H, W) float in [0, 1]
    overlay_rgb = overlay(rgb, heat[0], opacity=0.45)

Methods are chosen by name (:data:`CAM_METHODS`). Where each architecture is explained is a small
registry (:func:`find_target_layers`): the last feature map before global pooling, plus a
``reshape_transform`` that turns ViT tokens back into a (B, C, H, W) grid.

Speed: a CAM only needs the gradient of the class score with respect to the target layer's
activations. :class:`Cam` therefore runs the model with parameter gradients off and cuts the
graph at the target layer, so the backward pass only covers the head. Gradients at the target
layer are exactly those of a full backward pass; the saved cost is the weight gradients and the
backward through the backbone below the layer.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from core.errors import GlomError

log = logging.getLogger(__name__)

__all__ = ["CAM_METHODS", "CAM_METHOD_NAMES", "ExplainError", "TargetLayers", "find_target_layers",
           "open_cam", "Cam", "overlay", "mass_inside_box", "ClassDifferenceTarget"]


class ExplainError(GlomError, ValueError):
    """A CAM method or architecture this module cannot explain, or inputs it cannot use."""


# name -> (class, what a clinician reads in the method picker)
CAM_METHODS: dict[str, tuple[type[BaseCAM], str]] = {
    "gradcam": (GradCAM, "Grad-CAM"),
    "gradcam++": (GradCAMPlusPlus, "Grad-CAM++"),
    "hirescam": (HiResCAM, "HiResCAM"),
    "scorecam": (ScoreCAM, "Score-CAM (slow: one forward per channel)"),
    "eigencam": (EigenCAM, "EigenCAM (class-agnostic)"),
    "layercam": (LayerCAM, "LayerCAM"),
}
CAM_METHOD_NAMES: tuple[str, ...] = tuple(CAM_METHODS)
# Methods whose map does not depend on the target class (the "why not" selector has no effect).
CLASS_AGNOSTIC = frozenset({"eigencam"})


@dataclass
class TargetLayers:
    """Where to read activations, and how to turn them into (B, C, H, W)."""

    layers: list[nn.Module]
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    where: str = ""  # dotted module name(s), for logs and reports


# --- target-layer registry ------------------------------------------------------------------------


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ExplainError(f"{type(model).__name__} has no module {name!r}") from None


def _last_child_name(model: nn.Module, name: str) -> str:
    children = [n for n, _ in _module(model, name).named_children()]
    return f"{name}.{children[-1]}" if children else name


def _resnet(model: nn.Module) -> str:
    return _last_child_name(model, "layer4")  # the last block, after its residual add and ReLU


def _resnetv2(model: nn.Module) -> str:
    return "norm"  # pre-activation nets: the final norm+act is where the features become positive


def _stages(model: nn.Module) -> str:
    return _last_child_name(model, "stages")


def _vgg(model: nn.Module) -> str:
    # timm's VGG ends its conv stack in ``pre_logits`` (conv-MLP, still spatial); the last
    # convolutional feature map is ``features`` before the final max-pool.
    feats = [n for n, m in _module(model, "features").named_children() if not isinstance(m, nn.MaxPool2d)]
    return f"features.{feats[-1]}"


def _densenet(model: nn.Module) -> str:
    return "features.norm5"


def _efficientnet(model: nn.Module) -> str:
    return "bn2"  # conv_head → bn2 (norm + act): the last map before pooling


def _mobilenetv3(model: nn.Module) -> str:
    # MobileNetV3 pools *before* conv_head, so the last spatial map is the last block.
    return _last_child_name(model, "blocks")


def _inception_v3(model: nn.Module) -> str:
    return "Mixed_7c"


def _inception_v4(model: nn.Module) -> str:
    return _last_child_name(model, "features")


def _torchvision_wrapped(model: nn.Module) -> str:
    return _last_child_name(model, "features")  # googlenet: inception5b, shufflenet: conv5


def _backbone_with_attention(model: nn.Module) -> str:
    inner = model.backbone  # type: ignore[attr-defined]
    if hasattr(inner, "norm") and isinstance(inner.norm, nn.Module) and not isinstance(inner.norm, nn.Identity):
        return "backbone.norm"
    return "backbone." + _feature_info_name(inner)


def _vit(model: nn.Module) -> str:
    return _last_child_name(model, "blocks") + ".norm1"


def _feature_info_name(model: nn.Module) -> str:
    info = getattr(model, "feature_info", None)
    if not info:
        raise ExplainError(f"{type(model).__name__}: no registry entry and no timm feature_info to fall back on")
    return info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]


# Architecture-name patterns (fnmatch, first match wins) → a function naming the target layer.
# Covers the families the training core offers; anything else falls back to timm's feature_info.
_REGISTRY: list[tuple[tuple[str, ...], Callable[[nn.Module], str]]] = [
    (("resnetv2_*_attn",), _backbone_with_attention),
    (("se_resnet50_factorized", "ds_resnet50"), _resnet),  # seed models: timm ResNet with custom blocks
    (("googlenet", "shufflenetv2_*"), _torchvision_wrapped),
    (("resnetv2*",), _resnetv2),
    (("resnet*", "seresnet*", "resnext*", "seresnext*", "resnest*", "wide_resnet*", "ecaresnet*",
      "skresnet*", "test_resnet"), _resnet),
    (("vgg*",), _vgg),
    (("inception_v3*",), _inception_v3),
    (("inception_v4*", "inception_resnet_v2*"), _inception_v4),
    (("densenet*",), _densenet),
    (("mobilenetv3*", "tf_mobilenetv3*"), _mobilenetv3),
    (("efficientnet*", "tf_efficientnet*", "mobilenetv2*", "mnasnet*", "test_efficientnet*"), _efficientnet),
    (("convnext*", "test_convnext*"), _stages),
    (("vit_*", "deit*", "test_vit*", "eva*", "beit*"), _vit),
]


def vit_reshape_transform(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Tokens (B, prefix + H·W, C) → (B, C, H, W), dropping class/register tokens."""
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[:, n_prefix:, :]
        side = int(round(grid.shape[1] ** 0.5))
        if side * side != grid.shape[1]:
            raise ExplainError(f"ViT grid of {grid.shape[1]} tokens is not square")
        return grid.reshape(grid.shape[0], side, side, grid.shape[2]).permute(0, 3, 1, 2)

    return reshape


def find_target_layers(model: nn.Module, architecture: str | None = None) -> TargetLayers:
    """The layer(s) to explain for ``architecture`` (a timm name), with the reshape it needs."""
    from models.ensemble import EnsembleClassifier

    if isinstance(model, EnsembleClassifier):
        parts = [find_target_layers(m, architecture) for m in model.members]
        return TargetLayers([layer for p in parts for layer in p.layers], parts[0].reshape_transform,
                            ", ".join(f"members.{i}.{p.where}" for i, p in enumerate(parts)))
    arch = architecture or getattr(model, "pretrained_cfg", {}).get("architecture", "") or ""
    name = None
    for patterns, resolve in _REGISTRY:
        if any(fnmatch.fnmatchcase(arch, p) for p in patterns):
            name = resolve(model)
            break
    if name is None:
        name = _feature_info_name(model)
        log.info("no CAM registry entry for %r; using timm feature_info's last module %s", arch, name)
    reshape = vit_reshape_transform(model) if hasattr(model, "patch_embed") and hasattr(model, "blocks") else None
    return TargetLayers([_module(model, name)], reshape, name)


# --- targets ---------------------------------------------------------------------------------------


class ClassDifferenceTarget:
    """Score of ``category`` minus that of ``other``: "why this class rather than that one"."""

    def __init__(self, category: int, other: int) -> None:
        self.category, self.other = category, other

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return model_output[..., self.category] - model_output[..., self.other]


# --- running a CAM ---------------------------------------------------------------------------------


class Cam:
    """A CAM method bound to a model and its target layers; use it as a context manager.

    Hooks (pytorch-grad-cam's and the graph cut) are removed on exit, and the model's
    ``requires_grad`` flags are restored, even when the CAM raises.
    """

    def __init__(self, model: nn.Module, target: TargetLayers, method: str = "gradcam",
                 batch_size: int = 32) -> None:
        if method not in CAM_METHODS:
            raise ExplainError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHOD_NAMES)}")
        self.model, self.target, self.method = model, target, method
        self.batch_size = batch_size
        self._cam: BaseCAM | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_flags: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> Cam:
        self.model.eval()
        self._grad_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._grad_flags:
            p.requires_grad_(False)
        # Registered before pytorch-grad-cam's hooks, so they see (and hook) the cut tensor.
        for layer in self.target.layers:
            self._handles.append(layer.register_forward_hook(_cut_graph_here))
        cls = CAM_METHODS[self.method][0]
        self._cam = cls(model=self.model, target_layers=self.target.layers,
                        reshape_transform=self.target.reshape_transform)
        if self.method == "scorecam":
            self._cam.batch_size = self.batch_size  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        # Not ``with cam:`` on pytorch-grad-cam's object: its __exit__ swallows IndexError.
        if self._cam is not None:
            self._cam.activations_and_grads.release()
            self._cam = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        self._grad_flags.clear()

    @property
    def outputs(self) -> torch.Tensor | None:
        """Logits of the last call (the CAM's own forward pass)."""
        return getattr(self._cam, "outputs", None)

    def __call__(self, batch: torch.Tensor, target_class: int | Sequence[int] | None = None,
                 versus_class: int | None = None) -> np.ndarray:
        """Heatmaps (N, H, W) in [0, 1] at the input's resolution.

        ``target_class`` None explains each image's predicted class; ``versus_class`` explains
        "target rather than versus" (logit difference).
        """
        if self._cam is None:
            raise ExplainError("use the CAM inside `with open_cam(...) as cam:`")
        if batch.ndim != 4:
            raise ExplainError(f"expected a (N, C, H, W) batch, got shape {tuple(batch.shape)}")
        targets = None
        if target_class is not None:
            classes = [target_class] * len(batch) if isinstance(target_class, int) else list(target_class)
            if versus_class is not None and self.method not in CLASS_AGNOSTIC:
                targets = [ClassDifferenceTarget(c, versus_class) for c in classes]
            else:
                targets = [ClassifierOutputTarget(c) for c in classes]
        with torch.enable_grad():
            heat = self._cam(input_tensor=batch, targets=targets)
        return np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0).clip(0.0, 1.0)


def _cut_graph_here(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    # A fresh leaf that needs a gradient: backward stops here instead of running through the backbone.
    if isinstance(output, torch.Tensor):
        return output.detach().requires_grad_(True)
    return output


def open_cam(model: nn.Module, architecture: str | None = None, method: str = "gradcam",
             target: TargetLayers | None = None) -> Cam:
    """A :class:`Cam` for ``model`` with its registry target layers (or ``target``)."""
    return Cam(model, target or find_target_layers(model, architecture), method)


# --- showing it ------------------------------------------------------------------------------------


def overlay(rgb: np.ndarray, heat: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """The heatmap over the image (HWC uint8 RGB out); ``heat`` is resized to the image if needed.

    ``opacity`` 0 shows the image unchanged, 1 the heatmap only. The colour map is
    pytorch-grad-cam's (JET via OpenCV), but the blend is done here: ``show_cam_on_image``
    rescales the result by its maximum, which would brighten the tissue a clinician compares.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ExplainError(f"overlay needs an HWC uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    if not 0.0 <= opacity <= 1.0:
        raise ExplainError(f"opacity must lie in [0, 1], got {opacity}")
    if heat.ndim != 2:
        raise ExplainError(f"overlay needs a (H, W) heatmap, got shape {heat.shape}")
    if heat.shape != rgb.shape[:2]:
        heat = resize_heat(heat, rgb.shape[:2])
    colour = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * heat.clip(0, 1)), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    out = (1.0 - opacity) * rgb.astype(np.float32) + opacity * colour.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_heat(heat: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (H, W) map to ``size_hw``."""
    t = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=tuple(size_hw), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def mass_inside_box(heat: np.ndarray, box_xyxy: tuple[int, int, int, int]) -> float:
    """Fraction of the heatmap's total mass inside ``(x0, y0, x1, y1)`` (pixels of ``heat``)."""
    x0, y0, x1, y1 = (int(v) for v in box_xyxy)
    h, w = heat.shape
    total = float(heat.sum())
    if total <= 0:
        return 0.0
    return float(heat[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)].sum()) / total
