"""``glom evaluate-detector``: a detector checkpoint against masked tiles.

Object precision / recall / F1 at IoU ≥ 0.5 (one-to-one), AP@[.5:.95] (pycocotools), pixel
Dice, count error per image, and one overlay PNG per image (true outlines green, found red).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from core.detection.data import load_tiles, resolve_data_path
from core.detection.inference import Predictor, resolve_device
from core.detection.model import DetectorError, load_detector
from core.detection.scoring import coco_ap
from core.detection.train import evaluate_tiles

log = logging.getLogger(__name__)

__all__ = ["evaluate_detector", "overlay_outlines"]


def overlay_outlines(rgb: np.ndarray, true: np.ndarray, pred: np.ndarray, width: int = 2) -> np.ndarray:
    """RGB with the true instance outlines in green and the found ones in red (overlaps yellow)."""
    out = rgb.copy()

    def edges(labels: np.ndarray) -> np.ndarray:
        inner = ndi.grey_erosion(labels, size=(2 * width + 1, 2 * width + 1))
        return (labels > 0) & (inner != labels)

    et, ep = edges(true), edges(pred)
    out[et] = (0, 200, 0)
    out[ep] = (230, 0, 0)
    out[et & ep] = (240, 220, 0)
    return out


def evaluate_detector(checkpoint: str | Path, data: str | Path, out_dir: Path, *, data_mpp: float = 0.5,
                      split: str = "all", device: str = "auto", overlays: bool = True) -> dict[str, Any]:
    """Score ``checkpoint`` on ``data`` (``images/`` + ``masks/``); writes report.json, per_image.csv, overlays."""
    dev = resolve_device(device)
    model, meta = load_detector(checkpoint, dev)
    names = None
    if split != "all":
        if split not in ("test", "val", "train"):
            raise DetectorError(f"--split must be all, test, val or train, not {split!r}")
        names = meta.split.get(f"{split}_tiles")
        if not names:
            raise DetectorError(f"{checkpoint}: its sidecar records no {split} tiles (use --split all)")
    tiles = load_tiles(data, data_mpp, meta.mpp, names)
    if not tiles:
        raise DetectorError(f"{resolve_data_path(str(data))}: none of the {split} tiles is there")
    predictor = Predictor(model, meta, dev)
    post = dict(meta.postprocess, threshold=meta.threshold)
    summary, scores, preds, trues, _ = evaluate_tiles(predictor, tiles, post)
    summary.update(coco_ap(preds, trues))
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "per_image.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "true", "found", "matched", "count_error", "dice"])
        for s in scores:
            d = 2 * s.intersection / (s.pred_px + s.true_px) if s.pred_px + s.true_px else 1.0
            w.writerow([s.name, s.n_true, s.n_pred, s.tp, s.n_pred - s.n_true, round(d, 4)])
    if overlays:
        (out_dir / "overlays").mkdir(exist_ok=True)
        for t, (plab, _), tlab in zip(tiles, preds, trues):
            Image.fromarray(overlay_outlines(t.rgb, tlab, plab)).save(out_dir / "overlays" / f"{t.name}.png")
    report = {"checkpoint": str(checkpoint), "data": str(resolve_data_path(str(data))), "split": split,
              "data_mpp": data_mpp, "work_mpp": meta.mpp, **summary}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report
