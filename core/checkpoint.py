"""Checkpoints: weights in ``<stem>.safetensors`` plus a JSON sidecar ``<stem>.json``.

The sidecar says everything needed to use the weights without the training code's state:
architecture and its arguments, class schema, preprocessing, fitted stain normaliser, the split,
metrics, temperature, code revision. Loading reads JSON and safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_model, save_model
from torch import nn

import models  # noqa: F401  (registers the custom architectures)
from core.errors import GlomError

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "CheckpointMeta", "save_checkpoint", "load_checkpoint", "read_meta", "write_meta",
           "code_revision", "checkpoint_files", "load_weights_into", "FORMAT_VERSION"]

FORMAT_VERSION = 1


class CheckpointError(GlomError, RuntimeError):
    """A checkpoint is missing, incomplete, or does not match its sidecar."""


@dataclass
class CheckpointMeta:
    """What the JSON sidecar holds."""

    architecture: str
    num_classes: int
    classes: list[str]
    preprocess: dict[str, Any]
    display_names: list[str] = field(default_factory=list)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    stain: dict[str, Any] | None = None
    split: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    temperature: float | None = None
    tta: bool = False  # predictions average the 8 dihedral views
    ensemble: int = 0  # > 0: the weights are this many members of one architecture, logits averaged
    class_bias: list[float] | None = None  # added to calibrated logits: an operating point re-fitted for a site
    adapted: dict[str, Any] | None = None  # where and how class_bias was fitted
    epoch: int | None = None
    config: dict[str, Any] | None = None
    code_revision: str = ""
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def code_revision(repo: str | Path | None = None) -> str:
    """``git`` commit of the code (with ``+dirty`` when the tree has changes), or ``unknown``."""
    cwd = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def checkpoint_files(stem: str | Path) -> tuple[Path, Path]:
    """``(<stem>.safetensors, <stem>.json)`` for a stem or either file's path."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_checkpoint(model: nn.Module, stem: str | Path, meta: CheckpointMeta) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json``; returns the weights path."""
    weights, sidecar = checkpoint_files(stem)
    weights.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    meta.created_at = meta.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta.code_revision = meta.code_revision or code_revision()
    meta.versions = meta.versions or {"torch": torch.__version__, "timm": timm.__version__}
    # contiguous CPU copies: safetensors refuses non-contiguous (channels_last) tensors
    state_model = model
    if any(not p.is_contiguous() for p in model.state_dict().values()):
        state_model = _contiguous_copy(model)
    save_model(state_model, str(weights), metadata={"architecture": meta.architecture})
    write_meta(sidecar, meta)
    return weights


def write_meta(stem: str | Path, meta: CheckpointMeta) -> Path:
    """Write only the sidecar ``<stem>.json`` (e.g. a copy of the weights with a new operating point)."""
    _, sidecar = checkpoint_files(stem)
    sidecar.write_text(json.dumps(meta.to_dict(), indent=1, ensure_ascii=False, default=_json_default))
    return sidecar


def _contiguous_copy(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    for t in clone.state_dict().values():
        if not t.is_contiguous():
            t.data = t.data.contiguous()
    return clone


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_meta(stem: str | Path) -> CheckpointMeta:
    """Read only the sidecar."""
    _, sidecar = checkpoint_files(stem)
    if not sidecar.is_file():
        raise CheckpointError(f"no sidecar {sidecar}: a checkpoint is a .safetensors file plus its .json")
    d = json.loads(sidecar.read_text())
    if d.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{sidecar} has format {d['format_version']}; this code reads up to {FORMAT_VERSION}")
    known = set(CheckpointMeta.__dataclass_fields__)
    return CheckpointMeta(**{k: v for k, v in d.items() if k in known})


def build_model_from_meta(meta: CheckpointMeta) -> nn.Module:
    """The architecture the sidecar names, untrained (``pretrained=False``); an
    :class:`~models.ensemble.EnsembleClassifier` of ``meta.ensemble`` copies when it says so."""
    from models.ensemble import EnsembleClassifier

    try:
        def one() -> nn.Module:
            return timm.create_model(meta.architecture, pretrained=False, num_classes=meta.num_classes,
                                     **meta.model_kwargs)

        return EnsembleClassifier([one() for _ in range(meta.ensemble)]) if meta.ensemble else one()
    except RuntimeError as e:
        raise CheckpointError(f"cannot build {meta.architecture!r}: {e}") from None


def load_checkpoint(stem: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model from the sidecar and load the safetensors weights (strict); eval mode."""
    meta = read_meta(stem)
    return load_weights_into(build_model_from_meta(meta), stem, meta.architecture, device), meta


def load_weights_into(model: nn.Module, stem: str | Path, what: str,
                      device: str | torch.device = "cpu") -> nn.Module:
    """Load ``<stem>.safetensors`` into ``model`` (every tensor must fit: ``what`` names the model in
    the error), moved to ``device``, eval mode. Classifier and detector checkpoints load here."""
    weights, _ = checkpoint_files(stem)
    if not weights.is_file():
        raise CheckpointError(f"weights file {weights} is missing")
    missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match {what}: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval()
