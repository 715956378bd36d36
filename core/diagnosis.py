"""What the diagnosis viewer computes for a crop: calibrated probabilities, uncertainty and a CAM.

    ckpt = load_viewer_checkpoint("runs/quick/best.safetensors")
    [result] = diagnose(ckpt, [rgb], method="gradcam")
    result.predicted, result.probs, result.margin, result.heat   # heat: (H, W) in [0, 1]

Checkpoints are found under a runs folder (``<stem>.safetensors`` next to ``<stem>.json``) and
loaded through :mod:`core.checkpoint` (safetensors + JSON; nothing is unpickled). Loaded models
are cached per file (path, size, modification time), like a resource cache in a web app.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from core.checkpoint import CheckpointError, read_meta
from core.explain import CAM_METHODS, ExplainError, TargetLayers, find_target_layers, open_cam
from core.predict import Predictor

log = logging.getLogger(__name__)

__all__ = ["ViewerCheckpoint", "CropResult", "find_checkpoints", "load_viewer_checkpoint", "diagnose",
           "checkpoint_id", "CheckpointError"]


@dataclass
class ViewerCheckpoint:
    """A loaded checkpoint with what the viewer needs around it."""

    path: Path  # the .safetensors file
    id: str  # "<run>/<stem>@<sha256 prefix of the weights>": stable name in the store
    predictor: Predictor
    target: TargetLayers
    lock: threading.Lock = field(default_factory=threading.Lock)  # one request at a time on the model: CAM hooks

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    @property
    def display_names(self) -> dict[str, str]:
        return dict(zip(self.predictor.classes, self.predictor.display_names))

    @property
    def calibrated(self) -> bool:
        return bool(self.predictor.meta.temperature)


@dataclass
class CropResult:
    """One crop's prediction, most probable class first in ``ranked``."""

    probs: dict[str, float]
    predicted: str
    margin: float  # top-1 minus top-2 probability: small = uncertain
    heat: np.ndarray | None = None  # (H, W) in [0, 1] at the model's input resolution

    @property
    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.probs.items(), key=lambda kv: -kv[1])


def find_checkpoints(runs_dir: str | Path) -> list[Path]:
    """``.safetensors`` files with a JSON sidecar under ``runs_dir``, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("*.safetensors") if p.with_suffix(".json").is_file()]
    return sorted(found, key=lambda p: (-p.stat().st_mtime, str(p)))


def checkpoint_id(path: str | Path, runs_dir: str | Path | None = None) -> str:
    """``<run>/<stem>@<12 hex of the weights' sha256>``: changes when the weights do."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    name = path.with_suffix("").name
    if runs_dir is not None:
        try:
            name = path.with_suffix("").resolve().relative_to(Path(runs_dir).resolve()).as_posix()
        except ValueError:
            pass
    else:
        name = f"{path.parent.name}/{name}"
    return f"{name}@{digest.hexdigest()[:12]}"


def load_viewer_checkpoint(path: str | Path, runs_dir: str | Path | None = None) -> ViewerCheckpoint:
    """Load (or reuse) the checkpoint at ``path``; raises :class:`CheckpointError` in plain words."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    st = path.stat()
    return _load_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, str(runs_dir) if runs_dir else None)


@lru_cache(maxsize=4)
def _load_cached(path: str, size: int, mtime_ns: int, runs_dir: str | None) -> ViewerCheckpoint:
    read_meta(path)  # a missing or newer-format sidecar fails here, before any weights are read
    try:
        predictor = Predictor.from_checkpoint(path)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors header errors, shape mismatches inside timm
        raise CheckpointError(f"{Path(path).name} could not be loaded: {type(e).__name__}: {str(e)[:200]}") from None
    try:
        target = find_target_layers(predictor.model, predictor.meta.architecture)
    except ExplainError as e:
        raise CheckpointError(f"{Path(path).name}: no heatmap layer for {predictor.meta.architecture}: {e}") from None
    log.info("loaded %s (%s, classes %s)", path, predictor.meta.architecture, predictor.classes)
    return ViewerCheckpoint(Path(path), checkpoint_id(path, runs_dir), predictor, target)


def _margin(p: np.ndarray) -> float:
    top = np.sort(p)[::-1]
    return float(top[0] - (top[1] if len(top) > 1 else 0.0))


def diagnose(ckpt: ViewerCheckpoint, rgbs: Sequence[np.ndarray], *, method: str | None = "gradcam",
             target_class: str | None = None, versus_class: str | None = None,
             batch_size: int = 16) -> list[CropResult]:
    """Predict (calibrated when the checkpoint has a temperature) and, with ``method``, explain.

    The CAM explains ``target_class`` when given, else each crop's predicted class; with
    ``versus_class`` it explains "target rather than versus". Probabilities come from the same
    forward pass as the CAM, so a crop costs one forward and a backward through the head.
    """
    pred = ckpt.predictor
    if method is not None and method not in CAM_METHODS:
        raise ExplainError(f"unknown heatmap method {method!r}")
    for key in (target_class, versus_class):
        if key is not None and key not in pred.classes:
            raise ExplainError(f"class {key!r} is not one of this checkpoint's classes {pred.classes}")
    out: list[CropResult] = []
    for i in range(0, len(rgbs), batch_size):
        batch = torch.stack([pred.preprocess(rgb) for rgb in rgbs[i:i + batch_size]])
        heats: np.ndarray | None = None
        if method is None:
            with ckpt.lock:  # a CAM in another thread has hooks on this model while it runs
                probs = pred.predict_batch(batch)
        else:
            versus = pred.classes.index(versus_class) if versus_class is not None else None
            with ckpt.lock, open_cam(pred.model, pred.meta.architecture, method, ckpt.target) as cam:
                targets: int | list[int] | None = None
                if target_class is not None:
                    targets = pred.classes.index(target_class)
                elif versus is not None:
                    with torch.no_grad():
                        targets = pred.model(batch.to(pred.device)).argmax(1).tolist()
                heats = cam(batch, target_class=targets, versus_class=versus)
                # The CAM's own forward pass gives the logits (no second forward).
                logits = cam.outputs.detach().float()
            # A TTA checkpoint's probabilities are the 8-view mean, not the CAM's single view.
            if pred.tta:
                with ckpt.lock:
                    probs = pred.predict_batch(batch)
            else:
                probs = pred.probabilities(logits)
        for j, p in enumerate(probs):
            out.append(CropResult({k: float(v) for k, v in zip(pred.classes, p)}, pred.classes[int(p.argmax())],
                                  _margin(p), None if heats is None else heats[j]))
    return out
