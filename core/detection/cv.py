"""``glom cv-detector``: k-fold over tiles, the detector's trustworthy held-out figure.

    glom cv-detector --recipe recipes/detector/cpu.yaml --folds 4 [--set key=value ...]

The tiles are split into ``folds`` groups; each tile is tested exactly once. Every fold is an
ordinary training run (``runs/<name>-cv/fold-<k>/``, its own ``split.json``): test tiles = the
fold's group, validation tiles (early stopping, post-processing choice) carved at random from the
other tiles, crops pasted from the training slides only, as in a plain run. The best checkpoint of
each fold predicts its test tiles; the figures are computed on all out-of-fold tiles together
(object precision / recall / F1 at IoU ≥ 0.5, pixel Dice, AP, count error), each with a 95 %
interval from a bootstrap over tiles (tiles are the independent unit, as slides are in
:mod:`core.intervals`), then per fold. ``cv_report.json`` / ``cv_report.md``, ``per_tile.csv`` and an
overlay of every tile (true outlines green, found red) are written next to the folds.

A fold's checkpoint may carry post-processing chosen on its validation tiles
(``postprocess.tune``); the report then gives the out-of-fold figures both with the recipe's fixed
settings and with each fold's chosen ones (from the same probability maps).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.detection.config import DetectorConfig
from core.detection.data import load_tiles, resolve_data_path, split_detector_data
from core.detection.inference import Predictor, predict_image, resolve_device
from core.detection.instances import filter_by_score, label_instances
from core.detection.model import DetectorError, load_detector
from core.detection.scoring import (
    ImageScore,
    coco_ap,
    gt_instances,
    score_image,
    summarise,
)

log = logging.getLogger(__name__)

__all__ = ["DetectorCVResult", "bootstrap_tiles", "choose_on_fold_validation", "plan_tile_folds", "pooled_table",
           "rescore_detector_cv", "run_detector_cv"]

# figures with an interval, in report order
FIGURES = ("f1", "precision", "recall", "dice", "ap", "count_mae")


@dataclass
class DetectorCVResult:
    out_dir: Path
    report: dict[str, Any]


def plan_tile_folds(names: list[str], folds: int, val_tiles: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """``folds`` splits of the tile ``names``: each tile in exactly one fold's test part; per fold,
    ``val_tiles`` validation tiles drawn from the other tiles, the rest train. Deterministic in ``seed``."""
    names = sorted(names)
    if folds < 2:
        raise DetectorError(f"--folds must be at least 2, got {folds}")
    if len(names) < folds:
        raise DetectorError(f"{len(names)} tiles cannot make {folds} folds")
    shuffled = names[:]
    random.Random(f"cv:{seed}").shuffle(shuffled)
    out = []
    for k in range(folds):
        test = sorted(shuffled[k::folds])
        rest = [n for n in shuffled if n not in test]
        random.Random(f"cv:{seed}:{k}").shuffle(rest)
        if len(rest) - val_tiles < 1:
            raise DetectorError(f"fold {k}: {len(rest)} non-test tiles cannot give {val_tiles} validation tiles "
                                "and leave any for training (lower data.val_tiles or --folds)")
        out.append({"train_tiles": sorted(rest[val_tiles:]), "val_tiles": sorted(rest[:val_tiles]),
                    "test_tiles": test})
    return out


def _tile_figures(scores: list[ImageScore], preds: list | None = None, trues: list | None = None) -> dict[str, float]:
    figs = summarise(scores)
    if preds is not None and trues is not None:
        figs.update(coco_ap(preds, trues))
    return figs


def bootstrap_tiles(scores: list[ImageScore], preds: list, trues: list, n: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Each of :data:`FIGURES` pooled over the tiles, with a percentile interval from ``n`` resamples of
    whole tiles (with replacement). AP is pycocotools' and costs ~10 ms per resample."""
    value = _tile_figures(scores, preds, trues)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in FIGURES}
    m = len(scores)
    for _ in range(n if m > 1 else 0):
        idx = rng.integers(0, m, m)
        figs = _tile_figures([scores[i] for i in idx], [preds[i] for i in idx], [trues[i] for i in idx])
        for k in FIGURES:
            if figs[k] == figs[k]:  # not NaN (a resample without any glomerulus has no AP)
                draws[k].append(figs[k])
    a = (1 - level) / 2
    out: dict[str, dict[str, Any]] = {}
    for k in FIGURES:
        d = draws[k]
        lo, hi = (float(np.quantile(d, a)), float(np.quantile(d, 1 - a))) if len(d) >= 20 else (None, None)
        out[k] = {"value": float(value[k]), "lo": lo, "hi": hi}
    out["_pooled"] = {k: value[k] for k in ("n_true", "n_pred", "tp", "images", "matched_iou", "ap50", "ap75")}
    out["_resampled"] = {"unit": "tile", "groups": m, "n": n}
    return out


def _fmt(fig: dict[str, Any], digits: int = 3) -> str:
    v = f"{fig['value']:.{digits}f}"
    return v if fig.get("lo") is None else f"{v} [{fig['lo']:.{digits}f}–{fig['hi']:.{digits}f}]"


def _cv_dir(cfg: DetectorConfig, out_dir: str | Path | None) -> Path:
    from core.detection.train import fresh_dir

    return fresh_dir(Path(out_dir) if out_dir else Path(cfg.output_dir) / f"{cfg.name}-cv")


def _label(prob: np.ndarray, post: dict[str, Any], mpp: float) -> tuple[np.ndarray, list[float]]:
    labels, _ = label_instances(prob, post.get("threshold", 0.5), mpp, post.get("min_area_um2", 0.0),
                                post.get("split_min_distance_um", 60.0))
    labels, scores = filter_by_score(labels, prob, post.get("min_score", 0.0))
    return labels, scores


def _fold_predictor(checkpoint: Path, cfg: DetectorConfig, post_overrides: dict[str, Any] | None) -> Predictor:
    """A fold's checkpoint as a predictor, its post-processing changed by ``post_overrides``."""
    device = resolve_device(cfg.train.device)
    model, meta = load_detector(checkpoint, device)
    meta.postprocess = dict(meta.postprocess, **(post_overrides or {}))
    return Predictor(model, meta, device, amp=cfg.train.amp)


def _predict_tiles(predictor: Predictor, cfg: DetectorConfig, names: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(probability maps, true masks) of the tiles ``names`` at the predictor's working µm/px."""
    tiles = load_tiles(cfg.data.tiles, cfg.data.tiles_mpp, predictor.meta.mpp, names)
    return [predict_image(predictor, t.rgb) for t in tiles], [t.mask for t in tiles]


def _score_fold(checkpoint: Path, test_tiles: list[str], cfg: DetectorConfig, fold: int,
                oof: dict[str, dict[str, list]], overlay_dir: Path | None,
                post_overrides: dict[str, Any] | None = None, val_tiles: list[str] | None = None
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Predict a fold's test tiles with its checkpoint, score them with the recipe's post-processing
    (``fixed``) and the checkpoint's (``chosen``) into ``oof``; (chosen settings, per-tile rows). With
    ``val_tiles`` the ``chosen`` threshold and ``min_score`` are chosen again on those validation tiles
    (under ``post_overrides``), as training would have chosen them."""
    from core.detection.evaluate import overlay_outlines

    predictor = _fold_predictor(checkpoint, cfg, post_overrides)
    meta = predictor.meta
    chosen_post = dict(meta.postprocess, threshold=meta.threshold)
    if val_tiles:
        from core.detection.train import choose_postprocess

        chosen_post, _ = choose_postprocess(*_predict_tiles(predictor, cfg, val_tiles), chosen_post, meta.mpp)
    fixed_post = dict(cfg.postprocess.__dict__, **(post_overrides or {}))
    min_px = int(cfg.postprocess.min_area_um2 / (meta.mpp * meta.mpp))
    rows = []
    for t in load_tiles(cfg.data.tiles, cfg.data.tiles_mpp, meta.mpp, test_tiles):
        prob = predict_image(predictor, t.rgb)
        true = gt_instances(t.mask, min_px)  # slivers below the minimum area are not asked for
        for which, post in (("fixed", fixed_post), ("chosen", chosen_post)):
            labels, pscores = _label(prob, post, meta.mpp)
            s = score_image(t.name, labels, true)
            oof[which]["scores"].append(s)
            oof[which]["preds"].append((labels, pscores))
            oof[which]["trues"].append(true)
            if which == "chosen":
                d = 2 * s.intersection / (s.pred_px + s.true_px) if s.pred_px + s.true_px else 1.0
                rows.append({"tile": t.name, "fold": fold, "true": s.n_true, "found": s.n_pred, "matched": s.tp,
                             "count_error": s.n_pred - s.n_true, "dice": round(d, 4)})
                if overlay_dir is not None:
                    Image.fromarray(overlay_outlines(t.rgb, true, labels)).save(overlay_dir / f"{t.name}.png")
    return chosen_post, rows


def _fold_splits(cv_dir: Path) -> list[dict[str, Any]]:
    """Each fold's split (``splits/fold-<k>.json``: test, validation and training tiles), in fold order."""
    paths = sorted((cv_dir / "splits").glob("fold-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not paths:
        raise DetectorError(f"{cv_dir} holds no splits/fold-<k>.json: not a cv-detector folder")
    return [dict(json.loads(p.read_text()), fold=int(p.stem.split("-")[1])) for p in paths]


def rescore_detector_cv(cv_dir: str | Path, post_overrides: dict[str, Any], bootstrap: int = 1000,
                        retune: bool = False) -> dict[str, Any]:
    """The pooled out-of-fold figures of a finished CV again, with post-processing settings changed
    (e.g. ``{"tta": True}``) on every fold's checkpoint, without retraining: a candidate that needs no
    new training is compared on the same folds. With ``retune`` each fold's threshold and ``min_score``
    are chosen again on its own validation tiles under the changed settings (never on a test tile).
    Written to ``rescore-<settings>.json`` in ``cv_dir``."""
    from core.detection.config import load_detector_config

    cv_dir = Path(cv_dir)
    cfg = load_detector_config(cv_dir / "fold-0" / "config.yaml")
    oof: dict[str, dict[str, list]] = {"fixed": {"scores": [], "preds": [], "trues": []},
                                       "chosen": {"scores": [], "preds": [], "trues": []}}
    chosen = []
    for f in _fold_splits(cv_dir):
        post, _ = _score_fold(cv_dir / f"fold-{f['fold']}" / "best.safetensors", f["test_tiles"], cfg, f["fold"], oof,
                              None, post_overrides, f["val_tiles"] if retune else None)
        chosen.append({k: post.get(k) for k in ("threshold", "min_score")})
    out = {"post_overrides": post_overrides, "retune": retune, "chosen_per_fold": chosen,
           "pooled": {w: bootstrap_tiles(oof[w]["scores"], oof[w]["preds"], oof[w]["trues"], n=bootstrap)
                      for w in ("fixed", "chosen")}}
    tag = "-".join(f"{k}={v}" for k, v in sorted(post_overrides.items())) or "as-trained"
    (cv_dir / f"rescore-{tag}{'-retuned' if retune else ''}.json").write_text(json.dumps(out, indent=1))
    return out


def choose_on_fold_validation(cv_dir: str | Path, post_overrides: dict[str, Any] | None = None
                              ) -> tuple[dict[str, Any], dict[str, float]]:
    """One post-processing (threshold, ``min_score``) for a recipe, chosen on the **validation** tiles of
    all folds pooled, each predicted by its own fold's model (never a test tile): four times the
    validation glomeruli one run has. Returns (post-processing, its pooled validation figures); the
    choice is :func:`core.detection.train.choose_postprocess`'s."""
    from core.detection.config import load_detector_config
    from core.detection.train import choose_postprocess

    cv_dir = Path(cv_dir)
    cfg = load_detector_config(cv_dir / "fold-0" / "config.yaml")
    post = dict(cfg.postprocess.__dict__, **(post_overrides or {}))
    probs, masks = [], []
    for f in _fold_splits(cv_dir):
        p, m = _predict_tiles(_fold_predictor(cv_dir / f"fold-{f['fold']}" / "best.safetensors", cfg, post_overrides),
                              cfg, f["val_tiles"])
        probs += p
        masks += m
    return choose_postprocess(probs, masks, post, cfg.mpp)


def run_detector_cv(cfg: DetectorConfig, folds: int = 4, *, out_dir: str | Path | None = None, bootstrap: int = 1000,
                    progress: bool = True, overlays: bool = True) -> DetectorCVResult:
    """Train one detector per fold of the tiles and score every tile out of fold (see the module doc)."""
    from core.detection.train import train_detector

    if cfg.data.store.db:
        raise DetectorError("cv-detector folds the tiles of data.tiles; data.store (slides in the store) is not "
                            "folded: set data.store.db= for the CV")
    if cfg.data.split_file:
        raise DetectorError("cv-detector draws its own splits: drop data.split_file")
    start = time.monotonic()
    folder = resolve_data_path(cfg.data.tiles)
    names = sorted(p.stem for p in (folder / "images").glob("*.png"))
    if not names:
        raise DetectorError(f"{folder}/images holds no .png tiles")
    plan = plan_tile_folds(names, folds, cfg.data.val_tiles, cfg.data.seed)
    crop_split = split_detector_data(copy.deepcopy(cfg))  # the crop slides, as a plain run draws them
    cv_dir = _cv_dir(cfg, out_dir)
    (cv_dir / "splits").mkdir()
    if overlays:
        (cv_dir / "overlays").mkdir()
    rows: list[dict[str, Any]] = []
    oof: dict[str, dict[str, list]] = {"fixed": {"scores": [], "preds": [], "trues": []},
                                       "chosen": {"scores": [], "preds": [], "trues": []}}
    per_fold: list[dict[str, Any]] = []
    for k, part in enumerate(plan):
        split = {**part, "train_slides": crop_split.train_slides, "heldout_slides": crop_split.heldout_slides}
        split_path = cv_dir / "splits" / f"fold-{k}.json"
        split_path.write_text(json.dumps(split, indent=1))
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.name, fold_cfg.output_dir = f"fold-{k}", str(cv_dir)
        fold_cfg.data.split_file = str(split_path)
        log.info("fold %d/%d: %d train, %d validation, %d test tiles", k + 1, folds, len(part["train_tiles"]),
                 len(part["val_tiles"]), len(part["test_tiles"]))
        run = train_detector(fold_cfg, progress=progress)
        if run.run_dir != cv_dir / f"fold-{k}":
            raise DetectorError(f"fold {k} trained into {run.run_dir}, not {cv_dir / f'fold-{k}'}")
        chosen_post, fold_rows = _score_fold(run.checkpoint, part["test_tiles"], cfg, k, oof,
                                             cv_dir / "overlays" if overlays else None)
        rows += fold_rows
        fold_figs: dict[str, Any] = {"fold": k, "test_tiles": part["test_tiles"], "val_tiles": part["val_tiles"],
                                     "best_epoch": run.metrics["best_epoch"],
                                     "train_minutes": run.metrics["train_minutes"],
                                     "postprocess": {kk: chosen_post.get(kk) for kk in
                                                     ("threshold", "min_area_um2", "min_score", "tta")}}
        n_test = len(part["test_tiles"])
        for which in ("fixed", "chosen"):
            sl = slice(len(oof[which]["scores"]) - n_test, None)
            fold_figs[which] = _tile_figures(oof[which]["scores"][sl], oof[which]["preds"][sl],
                                             oof[which]["trues"][sl])
        per_fold.append(fold_figs)
        log.info("fold %d: test F1 %.3f Dice %.3f (chosen post-processing)", k, fold_figs["chosen"]["f1"],
                 fold_figs["chosen"]["dice"])

    tested = sorted(r["tile"] for r in rows)
    if tested != names:
        raise DetectorError(f"the folds tested {len(tested)} tiles, not each of the {len(names)} tiles once")
    report: dict[str, Any] = {
        "recipe": cfg.to_dict(), "folds": folds, "tiles": len(names), "seed": cfg.data.seed,
        "minutes": round((time.monotonic() - start) / 60, 2),
        "train_minutes": [f["train_minutes"] for f in per_fold],
        "pooled": {w: bootstrap_tiles(oof[w]["scores"], oof[w]["preds"], oof[w]["trues"], n=bootstrap)
                   for w in ("fixed", "chosen")},
        "per_fold": per_fold,
    }
    (cv_dir / "cv_report.json").write_text(json.dumps(report, indent=1))
    with (cv_dir / "per_tile.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: r["tile"]))
    (cv_dir / "cv_report.md").write_text("\n".join(summary_lines(report)) + "\n")
    return DetectorCVResult(cv_dir, report)


def pooled_table(pooled: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """Markdown rows of pooled out-of-fold figures (with intervals), one per post-processing in ``labels``."""
    lines = ["| post-processing | F1@0.5 | precision | recall | Dice | AP@[.5:.95] | count MAE | found / true / matched |",
             "|---|---|---|---|---|---|---|---|"]
    for which, label in labels.items():
        p = pooled[which]
        q = p["_pooled"]
        lines.append(f"| {label} | " + " | ".join(_fmt(p[k]) for k in FIGURES[:5]) + f" | {_fmt(p['count_mae'], 2)} | "
                     f"{q['n_pred']} / {q['n_true']} / {q['tp']} |")
    return lines


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: the pooled out-of-fold figures with intervals, then one row per fold."""
    r = report["recipe"]
    lines = [f"# Detector {report['folds']}-fold CV over {report['tiles']} tiles ({r['name']})", "",
             (f"Working {r['mpp']} µm/px, tile {r['tile_size']} px, {r['train']['epochs']} epochs × "
              f"{r['train']['samples_per_epoch']} samples; training minutes per fold: "
              f"{', '.join(str(m) for m in report['train_minutes'])}; whole CV {report['minutes']} min."), "",
             ("Out of fold, all tiles pooled, 95 % interval by bootstrap over tiles "
              f"({report['pooled']['chosen']['_resampled']['n']} resamples):"), ""]
    lines += pooled_table(report["pooled"], {"fixed": "recipe's fixed", "chosen": "chosen on each fold's validation"})
    lines += ["", ("| fold | test tiles | best epoch | minutes | post-processing chosen | F1 (fixed) | Dice (fixed) "
                   "| F1 (chosen) | Dice (chosen) |"), "|---|---|---|---|---|---|---|---|---|"]
    for f in report["per_fold"]:
        post = ", ".join(f"{k}={v}" for k, v in f["postprocess"].items() if v is not None)
        lines.append(f"| {f['fold']} | {' '.join(f['test_tiles'])} | {f['best_epoch']} | {f['train_minutes']} | {post} | "
                     f"{f['fixed']['f1']:.3f} | {f['fixed']['dice']:.3f} | {f['chosen']['f1']:.3f} | "
                     f"{f['chosen']['dice']:.3f} |")
    return lines
