"""Inference from a checkpoint: sidecar → model, stain normaliser and transforms → probabilities.

    predictor = Predictor.from_checkpoint("runs/quick/best.safetensors")
    predictor.predict_rgb(rgb)            # {"globally_sclerotic": 0.93, ...}
    predictor.predict_paths(paths)        # one dict per image

Temperature scaling fitted at training time is applied unless ``calibrated=False``, and so is a
class bias re-fitted for a new site (``glom adapt``); a checkpoint saved with ``tta`` averages the
8 dihedral views; an ensemble checkpoint averages its members. The model is
exposed (``predictor.model``) with ``forward_features``/``forward_head`` for Grad-CAM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.checkpoint import CheckpointMeta, load_checkpoint
from core.torch_data import read_rgb
from core.stain import PerStainNormalizer, StainNormalizer, create_stain_normalizer
from core.transforms import build_eval_transform, tta_logits

log = logging.getLogger(__name__)

__all__ = ["Predictor"]


class Predictor:
    """A loaded classifier with the preprocessing it was trained with."""

    def __init__(self, model: nn.Module, meta: CheckpointMeta, device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self.meta = meta
        self.device = torch.device(device)
        self.classes: list[str] = list(meta.classes)
        self.display_names: list[str] = list(meta.display_names or meta.classes)
        self.transform = build_eval_transform(meta.preprocess)
        self.stain: StainNormalizer | PerStainNormalizer | None = None
        if meta.stain:
            self.stain = create_stain_normalizer({k: v for k, v in meta.stain.items() if k != "references"})
        self.temperature = float(meta.temperature) if meta.temperature else 1.0
        self.tta = bool(meta.tta)
        self.class_bias = (torch.tensor(meta.class_bias, dtype=torch.float32)
                           if meta.class_bias is not None else None)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        """Load ``<stem>.safetensors`` + ``<stem>.json`` (never unpickles)."""
        model, meta = load_checkpoint(path, device)
        return cls(model, meta, device)

    def preprocess(self, rgb: np.ndarray, stain: str | None = None) -> torch.Tensor:
        """HWC uint8 RGB → the model's input tensor (C, H, W), stain-normalised when trained so.

        ``stain`` (``HE``, ``PAS``) picks the normaliser when the model was trained per stain.
        """
        if isinstance(self.stain, PerStainNormalizer):
            rgb = self.stain.transform(rgb, stain)
        elif self.stain is not None:
            rgb = self.stain.transform(rgb)
        return self.transform(rgb)

    @torch.no_grad()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw logits (N, C) for preprocessed tensors; the 8-view mean when the checkpoint uses TTA."""
        x = batch.to(self.device)
        return (tta_logits(self.model, x) if self.tta else self.model(x)).float()

    def probabilities(self, logits: torch.Tensor, calibrated: bool = True) -> np.ndarray:
        """Logits → probabilities: temperature, then the site's re-fitted class bias when there is one.

        ``calibrated=False`` gives the plain softmax (neither applied).
        """
        logits = logits.detach().float().cpu()
        if calibrated:
            logits = logits / self.temperature
            if self.class_bias is not None:
                logits = logits + self.class_bias
        return torch.softmax(logits, dim=1).numpy()

    @torch.no_grad()
    def predict_batch(self, batch: torch.Tensor, calibrated: bool = True) -> np.ndarray:
        """Probabilities (N, C) for preprocessed tensors (N, C, H, W)."""
        return self.probabilities(self.logits(batch), calibrated)

    def predict_rgb(self, rgb: np.ndarray, calibrated: bool = True, stain: str | None = None) -> dict[str, float]:
        """Class key → probability for one HWC uint8 RGB image."""
        probs = self.predict_batch(self.preprocess(rgb, stain)[None], calibrated)[0]
        return {k: float(p) for k, p in zip(self.classes, probs)}

    def predict_paths(self, paths: Sequence[str | Path], batch_size: int = 32,
                      calibrated: bool = True) -> list[dict[str, Any]]:
        """One ``{"path", "predicted", "probs"}`` dict per image file."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(paths), batch_size):
            chunk = list(paths[i:i + batch_size])
            batch = torch.stack([self.preprocess(read_rgb(p)) for p in chunk])
            for p, probs in zip(chunk, self.predict_batch(batch, calibrated)):
                out.append({"path": str(p), "predicted": self.classes[int(probs.argmax())],
                            "probs": {k: float(v) for k, v in zip(self.classes, probs)}})
        return out

    def cam_target_layers(self) -> list[nn.Module]:
        """The last convolutional stage, the usual Grad-CAM target (timm's ``feature_info``)."""
        info = getattr(self.model, "feature_info", None)
        if info:
            name = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
            return [self.model.get_submodule(name)]
        for attr in ("backbone", "features"):
            if hasattr(self.model, attr):
                inner = getattr(self.model, attr)
                if hasattr(inner, "feature_info") and inner.feature_info:
                    return [inner.get_submodule(inner.feature_info[-1]["module"])]
                children = list(inner.children())
                return [children[-1]]
        raise AttributeError(f"no obvious Grad-CAM layer for {type(self.model).__name__}")
