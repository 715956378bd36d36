"""Forward passes over tiles: batching, normalisation, AMP on CUDA, and overlap blending.

``Predictor`` turns a batch of HWC uint8 RGB tiles into glomerulus probabilities;
``blend_weights`` is the per-pixel weight tiles are accumulated with, so overlapping tiles fade
into each other instead of leaving seams; ``predict_image`` runs both over an in-memory image.
``mirror_edges`` extends an image by mirroring its border (the checkpoint's ``edge_mirror_um``): the
detector then sees a glomerulus cut by the image edge together with its mirror image.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from core.detection.model import DetectorError, DetectorMeta
from core.devices import resolve_device

# resolve_device (core.devices) is re-exported: the detector modules import it from here
__all__ = ["Predictor", "blend_weights", "edge_mirror_px", "mirror_edges", "predict_image", "resolve_device",
           "tile_origins"]


class Predictor:
    """Glomerulus probability of HWC uint8 RGB tiles (all the same size), batched on one device."""

    def __init__(self, model: nn.Module, meta: DetectorMeta, device: torch.device | str = "cpu",
                 amp: bool = True, tta: bool | None = None) -> None:
        self.device = torch.device(device)
        self.meta = meta
        self.cuda = self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp = amp and self.cuda
        # flip test-time augmentation: a checkpoint setting unless ``tta`` says otherwise
        self.tta = bool(meta.postprocess.get("tta", False)) if tta is None else tta
        self._mean = torch.tensor(meta.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(meta.std, device=self.device).view(1, 3, 1, 1) * 255

    @torch.inference_mode()
    def __call__(self, tiles: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """(N, H, W) float32 probabilities; H and W must be multiples of 32."""
        batch = np.ascontiguousarray(np.stack(list(tiles)) if not isinstance(tiles, np.ndarray) else tiles)
        if batch.ndim != 4 or batch.shape[3] != 3 or batch.dtype != np.uint8:
            raise DetectorError(f"tiles must be N×H×W×3 uint8 RGB, got {batch.dtype} {batch.shape}")
        if batch.shape[1] % 32 or batch.shape[2] % 32:
            raise DetectorError(f"tile sides must be multiples of 32, got {batch.shape[1]}×{batch.shape[2]}")
        x = torch.from_numpy(batch).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        with ctx:
            if self.tta:  # mean probability over the four flips (4 forward passes)
                prob = sum(torch.sigmoid(self.model(x.flip(d)).float()).flip(d) if d else
                           torch.sigmoid(self.model(x).float()) for d in ((), (3,), (2,), (2, 3))) / 4
            else:
                prob = torch.sigmoid(self.model(x).float())
        return prob[:, 0].cpu().numpy()


def blend_weights(size_px: int, overlap_px: int) -> np.ndarray:
    """(size, size) float32 weights: 1 inside, a linear ramp over the ``overlap`` margin (never 0)."""
    if overlap_px <= 0:
        return np.ones((size_px, size_px), np.float32)
    ramp = np.minimum(np.arange(size_px) + 1, np.arange(size_px)[::-1] + 1).astype(np.float32)
    ramp = np.clip(ramp / (overlap_px + 1), 1e-3, 1.0)
    return np.outer(ramp, ramp)


def tile_origins(length_px: int, size_px: int, overlap_px: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with tiles of ``size`` overlapping by ≥ ``overlap``."""
    if length_px <= size_px:
        return [0]
    stride = size_px - overlap_px
    if stride <= 0:
        raise DetectorError(f"overlap {overlap_px} px must be smaller than the tile ({size_px} px)")
    starts = list(range(0, length_px - size_px, stride))
    starts.append(length_px - size_px)
    return starts


def edge_mirror_px(meta: DetectorMeta) -> int:
    """The checkpoint's ``edge_mirror_um`` in working px (0: image edges are not mirrored)."""
    return max(0, round(float(meta.postprocess.get("edge_mirror_um", 0.0) or 0.0) / meta.mpp))


def mirror_edges(rgb: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    """``rgb`` (H, W, 3), or a (H, W) mask, extended by (top, bottom, left, right) px of its own border
    mirrored outwards (``numpy.pad`` ``symmetric``; a pad wider than the image repeats the reflection)."""
    top, bottom, left, right = (max(0, int(p)) for p in pad)
    if not (top or bottom or left or right):
        return rgb
    return np.pad(rgb, ((top, bottom), (left, right)) + ((0, 0),) * (rgb.ndim - 2), mode="symmetric")


def predict_image(predictor: Predictor, rgb: np.ndarray, tile_px: int = 512, overlap_px: int = 64,
                  batch_size: int = 8) -> np.ndarray:
    """(H, W) probability of a whole in-memory image at the working resolution, tiled and blended; the
    image's edges are mirrored outwards first when the checkpoint says so (:func:`edge_mirror_px`)."""
    m = edge_mirror_px(predictor.meta)
    h, w = rgb.shape[:2]
    prob = _predict_blended(predictor, mirror_edges(rgb, (m, m, m, m)), tile_px, overlap_px, batch_size)
    return prob[m:m + h, m:m + w]


def _predict_blended(predictor: Predictor, rgb: np.ndarray, tile_px: int, overlap_px: int,
                     batch_size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    ph, pw = max(h, tile_px), max(w, tile_px)
    if (ph, pw) != (h, w):  # smaller than one tile: pad with white (slide background)
        padded = np.full((ph, pw, 3), 255, np.uint8)
        padded[:h, :w] = rgb
        rgb = padded
    acc = np.zeros((ph, pw), np.float32)
    wsum = np.zeros((ph, pw), np.float32)
    weight = blend_weights(tile_px, overlap_px)
    boxes = [(y, x) for y in tile_origins(ph, tile_px, overlap_px) for x in tile_origins(pw, tile_px, overlap_px)]
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        probs = predictor([rgb[y:y + tile_px, x:x + tile_px] for y, x in chunk])
        for (y, x), p in zip(chunk, probs):
            acc[y:y + tile_px, x:x + tile_px] += p * weight
            wsum[y:y + tile_px, x:x + tile_px] += weight
    return (acc / wsum)[:h, :w]
