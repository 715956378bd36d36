"""Detector metrics: object precision/recall/F1 at IoU ≥ 0.5 (one-to-one), COCO AP, pixel Dice, counts.

Instances are label images (0 = background). Matching is one to one (Hungarian on IoU), a pair
counts when its IoU ≥ ``iou``. AP@[.5:.95] is pycocotools' segm evaluation on RLE masks.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

__all__ = ["ImageScore", "coco_ap", "dice", "gt_instances", "iou_matrix", "match_instances", "summarise"]


@dataclass
class ImageScore:
    name: str
    n_true: int
    n_pred: int
    tp: int
    intersection: int
    pred_px: int
    true_px: int
    ious: list[float] = field(default_factory=list)  # of the matched pairs


def gt_instances(mask: np.ndarray, min_px: int = 0) -> np.ndarray:
    """Label image of a bool ground-truth mask (connected components ≥ ``min_px``)."""
    labels, n = ndi.label(mask)
    if min_px and n:
        small = np.bincount(labels.ravel(), minlength=n + 1) < min_px  # one pass, however many specks
        small[0] = False
        labels[small[labels]] = 0
        labels, _ = ndi.label(labels > 0)
    return labels.astype(np.int32)


def iou_matrix(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(n_pred, n_true) IoU of two label images of the same shape."""
    n_p, n_t = int(pred.max()), int(true.max())
    if n_p == 0 or n_t == 0:
        return np.zeros((n_p, n_t))
    joint = np.bincount((pred.astype(np.int64) * (n_t + 1) + true).ravel(), minlength=(n_p + 1) * (n_t + 1))
    joint = joint.reshape(n_p + 1, n_t + 1)
    inter = joint[1:, 1:]
    area_p, area_t = joint[1:, :].sum(1), joint[:, 1:].sum(0)
    return inter / (area_p[:, None] + area_t[None, :] - inter)


def match_instances(pred: np.ndarray, true: np.ndarray, iou: float = 0.5) -> list[float]:
    """IoUs of the one-to-one matched pairs with IoU ≥ ``iou``."""
    m = iou_matrix(pred, true)
    if m.size == 0:
        return []
    rows, cols = linear_sum_assignment(-m)
    return [float(m[r, c]) for r, c in zip(rows, cols) if m[r, c] >= iou]


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    inter = np.logical_and(pred, true).sum()
    total = pred.sum() + true.sum()
    return 1.0 if total == 0 else float(2 * inter / total)


def score_image(name: str, pred: np.ndarray, true: np.ndarray, iou: float = 0.5) -> ImageScore:
    ious = match_instances(pred, true, iou)
    pb, tb = pred > 0, true > 0
    return ImageScore(name, int(true.max()), int(pred.max()), len(ious), int(np.logical_and(pb, tb).sum()),
                      int(pb.sum()), int(tb.sum()), ious)


def coco_ap(preds: list[tuple[np.ndarray, list[float]]], trues: list[np.ndarray]) -> dict[str, float]:
    """AP@[.5:.95], AP50, AP75 (pycocotools, segm) over images: ``preds`` = (labels, per-label scores)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for img_id, ((plab, scores), tlab) in enumerate(zip(preds, trues), start=1):
        h, w = tlab.shape
        images.append({"id": img_id, "height": h, "width": w})
        for i in range(1, int(tlab.max()) + 1):
            rle = mask_utils.encode(np.asfortranarray((tlab == i).astype(np.uint8)))
            area = float(mask_utils.area(rle))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 1, "segmentation": rle,
                         "area": area, "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
        for i in range(1, int(plab.max()) + 1):
            rle = mask_utils.encode(np.asfortranarray((plab == i).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            dets.append({"image_id": img_id, "category_id": 1, "segmentation": rle, "score": float(scores[i - 1])})
    if not anns:
        return {"ap": float("nan"), "ap50": float("nan"), "ap75": float("nan")}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "glomerulus"}]}
        gt.createIndex()
        dt = gt.loadRes(dets) if dets else None
        if dt is None:
            return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
        ev = COCOeval(gt, dt, "segm")
        ev.params.areaRng = [[0, 1e10]] * 4  # glomeruli are all "large" at any µm/px: one range
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"ap": float(ev.stats[0]), "ap50": float(ev.stats[1]), "ap75": float(ev.stats[2])}


def summarise(scores: list[ImageScore]) -> dict[str, float]:
    """Pooled precision, recall, F1 (IoU ≥ 0.5), Dice, and the mean absolute count error per image."""
    tp = sum(s.tp for s in scores)
    n_pred = sum(s.n_pred for s in scores)
    n_true = sum(s.n_true for s in scores)
    p = tp / n_pred if n_pred else (1.0 if n_true == 0 else 0.0)
    r = tp / n_true if n_true else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    inter = sum(s.intersection for s in scores)
    total = sum(s.pred_px + s.true_px for s in scores)
    ious = [i for s in scores for i in s.ious]
    return {"precision": p, "recall": r, "f1": f1, "dice": 2 * inter / total if total else 1.0,
            "count_mae": float(np.mean([abs(s.n_pred - s.n_true) for s in scores])) if scores else 0.0,
            "matched_iou": float(np.mean(ious)) if ious else 0.0, "n_true": n_true, "n_pred": n_pred, "tp": tp,
            "images": len(scores)}
