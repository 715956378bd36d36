"""``glom train-detector``: train the glomerulus segmenter from a recipe.

``runs/<name>/`` receives ``config.yaml`` (resolved), ``split.json``, ``metrics.csv`` (one row per
epoch), ``best.safetensors`` + ``best.json`` (the model: highest validation Dice, ties F1; with
``train.select: last`` the last epoch's), ``last.*`` and ``report.json`` (validation and held-out test
tiles: object F1 at IoU ≥ 0.5, Dice, AP).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from core.detection.config import DetectorConfig
from core.detection.data import (
    DetectorTrainingSet,
    HardPoint,
    TileImage,
    TrainingSampler,
    load_crops,
    load_store_windows,
    load_tiles,
    resolve_data_path,
    split_detector_data,
)
from core.detection.inference import (
    Predictor,
    edge_mirror_px,
    predict_image,
    resolve_device,
)
from core.detection.instances import filter_by_score, label_instances
from core.detection.model import (
    DetectorError,
    DetectorMeta,
    create_detector,
    save_detector,
)
from core.detection.scoring import ImageScore, gt_instances, score_image, summarise

log = logging.getLogger(__name__)

__all__ = ["DetectorRun", "choose_postprocess", "dice_bce_loss", "evaluate_tiles", "mine_hard_negatives",
           "train_detector"]


@dataclass
class DetectorRun:
    run_dir: Path
    checkpoint: Path
    metrics: dict[str, Any]


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (per batch): BCE for calibrated pixels, Dice against the many background pixels."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    soft_dice = 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return bce + soft_dice


def evaluate_tiles(predictor: Predictor, tiles: list[TileImage], post: dict[str, Any], tile_px: int = 512,
                   overlap_px: int = 64) -> tuple[dict[str, float], list[ImageScore], list[tuple[np.ndarray, list[float]]],
                                                  list[np.ndarray], list[np.ndarray]]:
    """Predict whole tiles and score them; returns (summary, per-image scores, predictions, truths, probs)."""
    mpp = predictor.meta.mpp
    min_px = int(post.get("min_area_um2", 0) / (mpp * mpp))
    scores, preds, trues, probs = [], [], [], []
    for t in tiles:
        prob = predict_image(predictor, t.rgb, tile_px=tile_px, overlap_px=overlap_px)
        labels, _ = label_instances(prob, post.get("threshold", 0.5), mpp, post.get("min_area_um2", 0.0),
                                    post.get("split_min_distance_um", 60.0))
        labels, pscores = filter_by_score(labels, prob, post.get("min_score", 0.0))
        # ground truth with the same minimum area: a sliver of a glomerulus cut by the tile border
        # is not something the detector is asked to report
        true = gt_instances(t.mask, min_px)
        scores.append(score_image(t.name, labels, true))
        preds.append((labels, pscores))
        trues.append(true)
        probs.append(prob)
    return summarise(scores), scores, preds, trues, probs


MINING_THRESHOLD = 0.3  # near misses count: what a stricter tuned threshold would still let through
MINING_CLEARANCE_UM = 20.0  # a finding this close to a true glomerulus is its outline's error, not a false one
MINING_MAX_TILE_PX = 1024  # a tile (with its mirrored edges) up to this side is predicted in one forward pass


def mine_hard_negatives(predictor: Predictor, tiles: list[TileImage], indices: list[int],
                        min_area_um2: float) -> dict[int, list[HardPoint]]:
    """False findings of the model on these training tiles: for each tile index, one point (the most
    probable pixel) of every region with probability ≥ ``MINING_THRESHOLD``, at least
    ``MINING_CLEARANCE_UM`` from every glomerulus of the mask and of at least a quarter of
    ``min_area_um2``. The model is left in eval mode. A tile is predicted as :func:`predict_image` does
    (edges mirrored as the checkpoint says) but in one forward pass when it fits ``MINING_MAX_TILE_PX``:
    no overlapping 512 px tiles (a 512² tile with 128 px mirrored edges: one 768² pass instead of four
    512² ones)."""
    from scipy import ndimage as ndi

    m = edge_mirror_px(predictor.meta)
    mpp = predictor.meta.mpp
    clear = max(1, round(MINING_CLEARANCE_UM / mpp))
    min_px = max(1, int(min_area_um2 / 4 / (mpp * mpp)))
    out: dict[int, list[HardPoint]] = {}
    for ti in indices:
        t = tiles[ti]
        side = -(-(max(t.rgb.shape[:2]) + 2 * m) // 32) * 32
        prob = predict_image(predictor, t.rgb, tile_px=min(side, MINING_MAX_TILE_PX))
        near = ndi.binary_dilation(t.mask, iterations=clear)
        labels = gt_instances((prob >= MINING_THRESHOLD) & ~near, min_px)  # regions of at least min_px
        peaks = ndi.maximum_position(prob, labels, range(1, int(labels.max()) + 1))
        out[ti] = [(ti, int(y), int(x)) for y, x in peaks]
    return out


THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_SCORES = (0.0, 0.6, 0.7, 0.8, 0.85, 0.9)


def choose_postprocess(probs: list[np.ndarray], masks: list[np.ndarray], post: dict[str, Any],
                       mpp: float) -> tuple[dict[str, Any], dict[str, float]]:
    """The pixel threshold and finding score threshold (``min_score``) with the best F1 on these
    (validation) tiles, then the best Dice; ties go to the recipe's values. The minimum area stays the
    recipe's: it also says which true glomeruli count. Returns (post-processing, its figures)."""
    min_px = int(post.get("min_area_um2", 0) / (mpp * mpp))
    trues = [gt_instances(m, min_px) for m in masks]
    best_key, best = None, (dict(post), {})
    for thr in THRESHOLDS:
        labelled = [label_instances(p, thr, mpp, post.get("min_area_um2", 0.0), post.get("split_min_distance_um", 60.0))[0]
                    for p in probs]
        for ms in MIN_SCORES:
            if 0 < ms <= thr:  # every finding's mean probability is above the pixel threshold already
                continue
            scores = [score_image(str(i), filter_by_score(lab, p, ms)[0], t)
                      for i, (lab, p, t) in enumerate(zip(labelled, probs, trues))]
            figs = summarise(scores)
            key = (round(figs["f1"], 6), round(figs["dice"], 6), -abs(thr - post.get("threshold", 0.5)),
                   -abs(ms - post.get("min_score", 0.0)))
            if best_key is None or key > best_key:
                best_key, best = key, (dict(post, threshold=thr, min_score=ms), figs)
    return best


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fresh_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... : the first that is missing or empty, created."""
    d, i = base, 1
    while d.exists() and any(d.iterdir()):
        i += 1
        d = base.with_name(f"{base.name}-{i}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run_dir(cfg: DetectorConfig) -> Path:
    return fresh_dir(Path(cfg.output_dir) / cfg.name)


def train_detector(cfg: DetectorConfig, progress: bool = True) -> DetectorRun:
    """Train, early-stop on validation Dice, evaluate the best model on the held-out tiles."""
    from core.detection.scoring import coco_ap

    _seed(cfg.seed)
    t_cfg = cfg.train
    if t_cfg.threads:
        torch.set_num_threads(t_cfg.threads)
    device = resolve_device(t_cfg.device)
    cuda = device.type == "cuda"
    run_dir = _run_dir(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    split = split_detector_data(cfg)
    (run_dir / "split.json").write_text(json.dumps(split.to_dict(), indent=1))

    tiles_dir = cfg.data.tiles
    train_tiles = load_tiles(tiles_dir, cfg.data.tiles_mpp, cfg.mpp, split.train_tiles)
    val_tiles = load_tiles(tiles_dir, cfg.data.tiles_mpp, cfg.mpp, split.val_tiles)
    test_tiles = load_tiles(tiles_dir, cfg.data.tiles_mpp, cfg.mpp, split.test_tiles)
    crops = (load_crops(cfg.data.crops_csv, set(split.train_slides), cfg.data.crop_labels)
             if cfg.data.crops_csv else [])
    stored = load_store_windows(cfg, split)  # glomeruli stored on slides, as tiles (grouped by slide)
    train_tiles += [w.tile for w in stored["train"]]
    val_tiles += [w.tile for w in stored["val"]]
    test_tiles += [w.tile for w in stored["test"]]
    log.info("detector data: %d/%d/%d train/val/test tiles, %d pasted crops from %d slides",
             len(train_tiles), len(val_tiles), len(test_tiles), len(crops), len(split.train_slides))

    m = cfg.model
    model_kwargs = {"encoder_depth": m.encoder_depth, "decoder_channels": list(m.decoder_channels)}
    model = create_detector(m.architecture, m.encoder, pretrained_file=m.pretrained_file, **model_kwargs)
    meta = DetectorMeta(architecture=m.architecture, encoder=m.encoder, mpp=cfg.mpp, tile_size=cfg.tile_size,
                        threshold=cfg.postprocess.threshold, model_kwargs=model_kwargs,
                        postprocess=dict(cfg.postprocess.__dict__),
                        training_data={"tiles": str(resolve_data_path(tiles_dir)), "tiles_mpp": cfg.data.tiles_mpp,
                                       "crops_csv": str(resolve_data_path(cfg.data.crops_csv)) if cfg.data.crops_csv else "",
                                       "crop_labels": list(cfg.data.crop_labels),
                                       "n_train_tiles": len(train_tiles), "n_pasted_crops": len(crops),
                                       "n_store_windows": {k: len(v) for k, v in stored.items()},
                                       "encoder_weights": m.pretrained_file or "none"},
                        split=split.to_dict(), config=cfg.to_dict())
    model.to(device)
    if cuda and t_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    ds = DetectorTrainingSet(train_tiles, crops, cfg.tile_size, cfg.mpp, cfg.augment, t_cfg.samples_per_epoch,
                             tuple(meta.mean), tuple(meta.std), seed=cfg.seed,
                             edge_mirror_px=edge_mirror_px(meta))
    # the sampler carries the epoch and the mined hard negatives to the (persistent) workers
    sampler = TrainingSampler(t_cfg.samples_per_epoch, seed=cfg.seed, hard_negative_p=t_cfg.hard_negative_p)
    loader = torch.utils.data.DataLoader(ds, batch_size=t_cfg.batch_size, sampler=sampler,
                                         num_workers=t_cfg.num_workers, pin_memory=cuda, drop_last=True,
                                         persistent_workers=t_cfg.num_workers > 0)
    hard: dict[int, list[HardPoint]] = {}  # training tile index -> its latest mined false findings
    next_mined = 0
    opt = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    steps = max(1, t_cfg.epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t_cfg.lr, total_steps=steps, pct_start=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and t_cfg.amp)
    post = dict(cfg.postprocess.__dict__)
    fields = ["epoch", "train_loss", "hard_negatives", "val_dice", "val_f1", "val_precision", "val_recall", "lr",
              "seconds"]
    csv_path = run_dir / "metrics.csv"
    with csv_path.open("w", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writeheader()

    # mining and per-epoch validation see the model as it is now through the plain forward: what the model marks,
    # and a progress signal, not the checkpoint's figure (flip TTA would cost 4x)
    plain = Predictor(model, meta, device, amp=t_cfg.amp, tta=False)
    best_key, best_epoch, stale = (-1.0, -1.0), -1, 0
    start = time.monotonic()
    epochs = tqdm(range(1, t_cfg.epochs + 1), desc="epochs", disable=not progress, unit="ep")
    for epoch in epochs:
        if t_cfg.hard_negative_p and epoch >= t_cfg.hard_negative_start:
            n_turn = min(t_cfg.hard_negative_tiles, len(train_tiles))
            turn = [(next_mined + k) % len(train_tiles) for k in range(n_turn)]
            next_mined = (next_mined + len(turn)) % len(train_tiles)
            hard.update(mine_hard_negatives(plain, train_tiles, turn, cfg.postprocess.min_area_um2))
            sampler.set_hard_negatives([p for pts in hard.values() for p in pts])
        model.train()
        sampler.set_epoch(epoch)
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress, unit="batch")
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cuda and t_cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda and t_cfg.amp):
                logits = model(x)
            loss = dice_bce_loss(logits.float(), y)
            if not math.isfinite(loss.item()):
                raise DetectorError(f"epoch {epoch}: the loss became {loss.item()} (lower train.lr)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        model.eval()
        val, *_ = evaluate_tiles(plain, val_tiles, post)
        row = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5), "hard_negatives": len(sampler.hard),
               "val_dice": round(val["dice"], 5),
               "val_f1": round(val["f1"], 5), "val_precision": round(val["precision"], 5),
               "val_recall": round(val["recall"], 5), "lr": opt.param_groups[0]["lr"],
               "seconds": round(time.monotonic() - start, 1)}
        with csv_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow(row)
        epochs.set_postfix(loss=row["train_loss"], val_dice=row["val_dice"], val_f1=row["val_f1"])
        log.info("epoch %d: %s", epoch, row)
        meta.epoch = epoch
        meta.metrics = {"val": val}
        save_detector(model, run_dir / "last", meta)
        # train.select last (or no validation): every epoch is the newest best, early stopping never fires
        key = (val["dice"], val["f1"]) if val_tiles and t_cfg.select == "best" else (float(epoch), 0.0)
        if key > best_key:
            best_key, best_epoch, stale = key, epoch, 0
            save_detector(model, run_dir / "best", meta)
        else:
            stale += 1
        if t_cfg.early_stopping_patience and stale >= t_cfg.early_stopping_patience:
            log.info("early stop after epoch %d: no better validation Dice for %d epochs", epoch, stale)
            break
        if t_cfg.max_minutes and time.monotonic() - start > t_cfg.max_minutes * 60:
            log.info("stopping after epoch %d: train.max_minutes=%s reached", epoch, t_cfg.max_minutes)
            break

    from core.detection.model import load_detector

    best, meta = load_detector(run_dir / "best", device)
    predictor = Predictor(best, meta, device, amp=t_cfg.amp)
    report: dict[str, Any] = {"best_epoch": best_epoch, "train_minutes": round((time.monotonic() - start) / 60, 2)}
    if cfg.postprocess.tune and val_tiles:  # chosen on validation only; the test tiles are scored once, after
        _, _, _, _, val_probs = evaluate_tiles(predictor, val_tiles, post)
        post, chosen = choose_postprocess(val_probs, [t.mask for t in val_tiles], post, meta.mpp)
        meta.threshold = post["threshold"]
        meta.postprocess = post
        report["postprocess_chosen"] = {"threshold": post["threshold"], "min_score": post["min_score"],
                                        "val_f1": chosen["f1"], "val_dice": chosen["dice"]}
        log.info("post-processing chosen on the validation tiles: %s", report["postprocess_chosen"])
    for part, tiles in (("val", val_tiles), ("test", test_tiles)):
        summary, _, preds, trues, _ = evaluate_tiles(predictor, tiles, post)
        summary.update(coco_ap(preds, trues))
        report[part] = summary
    meta.metrics = report
    save_detector(best, run_dir / "best", meta)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    log.info("best epoch %d; held-out test tiles: %s", best_epoch, report["test"])
    return DetectorRun(run_dir, run_dir / "best.safetensors", report)
