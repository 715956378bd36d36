"""``glom train-detector``, ``glom evaluate-detector``, ``glom cv-detector`` and ``glom detect``.

Wiring: ``core.cli`` lists this module in ``COMMAND_MODULES`` and calls ``register``; each
command returns its exit code (0 ok, 1 some slides failed, 2 bad input).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from annotation_db.db import StoreError
from core.errors import GlomError

log = logging.getLogger(__name__)


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _cmd_train_detector(args: argparse.Namespace) -> int:
    from core.config import ConfigError
    from core.detection.config import load_detector_config
    from core.detection.train import train_detector

    try:
        cfg = load_detector_config(args.recipe, args.overrides)
        run = train_detector(cfg, progress=not args.no_progress)
    except (ConfigError, GlomError, OSError) as e:
        return _error(str(e))
    test = run.metrics.get("test", {})
    print(f"{run.checkpoint} (best epoch {run.metrics['best_epoch']}, {run.metrics['train_minutes']} min); "
          f"held-out test tiles: F1@0.5 {test.get('f1', float('nan')):.3f}, Dice {test.get('dice', float('nan')):.3f}, "
          f"AP {test.get('ap', float('nan')):.3f}")
    return 0


def _cmd_evaluate_detector(args: argparse.Namespace) -> int:
    from core.checkpoint import CheckpointError
    from core.detection.evaluate import evaluate_detector

    out = args.out or Path(args.checkpoint).with_suffix("").parent / f"eval-{Path(args.data).name}-{args.split}"
    try:
        report = evaluate_detector(args.checkpoint, args.data, Path(out), data_mpp=args.data_mpp, split=args.split,
                                   device=args.device, overlays=not args.no_overlays)
    except (CheckpointError, GlomError, OSError) as e:
        return _error(str(e))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()}, indent=1))
    print(f"report, per-image CSV and overlays in {out}")
    return 0


def _cmd_cv_detector(args: argparse.Namespace) -> int:
    from core.config import ConfigError
    from core.detection.config import load_detector_config
    from core.detection.cv import run_detector_cv, summary_lines

    try:
        cfg = load_detector_config(args.recipe, args.overrides)
        res = run_detector_cv(cfg, args.folds, out_dir=args.out, bootstrap=args.bootstrap,
                              progress=not args.no_progress, overlays=not args.no_overlays)
    except (ConfigError, GlomError, OSError) as e:
        return _error(str(e))
    print("\n".join(summary_lines(res.report)))
    print(f"report, per-tile CSV, overlays and the fold runs in {res.out_dir}")
    return 0


# --- glom detect ----------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_init(checkpoint: str, device: str, threads: int) -> None:
    import torch

    from core.detection.inference import Predictor, resolve_device
    from core.detection.model import load_detector

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    model, meta = load_detector(checkpoint, dev)
    _WORKER["predictor"] = Predictor(model, meta, dev)


def _worker_detect(slide: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from core.detection.slides import detect_slide

    det, out = detect_slide(slide, _WORKER["predictor"], **kwargs)
    return {"slide": slide, "n": len(det.instances), "skipped": det.skipped, "out": str(out),
            "seconds": det.seconds, "tiles": det.tiles_read}


def _store_proposals(args: argparse.Namespace, slide: str, out: str) -> int:
    from annotation_db.db import open_store
    from annotation_db.proposals import replace_proposals
    from core.detection.slides import _instances_from_doc
    from core.wsi import slide_name

    doc = json.loads(Path(out).read_text())
    Session = open_store(args.db)
    with Session() as s, s.begin():
        return replace_proposals(s, args.dataset, slide_name(slide), _instances_from_doc(doc),
                                 source=f"model:{Path(args.checkpoint).with_suffix('').name}",
                                 checkpoint_sha256=doc["glomlab"]["checkpoint_sha256"],
                                 slide_path=str(Path(slide).resolve()))


def _cmd_detect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.checkpoint import CheckpointError
    from core.detection.inference import resolve_device
    from core.detection.model import read_detector_meta
    from core.detection.slides import (
        DetectSettings,
        DetectSlideError,
        checkpoint_digest,
    )

    try:
        meta = read_detector_meta(args.checkpoint)
        digest = checkpoint_digest(args.checkpoint)
        resolve_device(args.device)
    except (CheckpointError, GlomError, OSError) as e:
        return _error(str(e))
    missing = [s for s in args.slides if not Path(s).is_file()]
    if missing:
        return _error(f"no such slide file: {', '.join(missing)}")
    settings = DetectSettings.from_meta(meta, tile_px=args.tile_px, overlap_px=args.overlap_px,
                                        batch_size=args.batch_size, threshold=args.threshold,
                                        min_area_um2=args.min_area_um2)
    if settings.tile_px % 32 or settings.overlap_px >= settings.tile_px:
        return _error(f"--tile-px must be a multiple of 32 larger than --overlap-px (got {settings.tile_px}, "
                      f"{settings.overlap_px})")
    out_dir = Path(args.out)
    kwargs = {"settings": settings, "out_dir": out_dir, "checkpoint": str(Path(args.checkpoint).with_suffix("")),
              "digest": digest, "slide_mpp": args.mpp, "resume": not args.no_resume}
    workers = max(1, min(args.workers, len(args.slides)))
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    failures = 0
    overall = tqdm(total=len(args.slides), desc="slides", unit="slide", disable=args.no_progress)

    def done(res: dict[str, Any]) -> None:
        nonlocal failures
        stored = ""
        if args.dataset:
            try:
                n = _store_proposals(args, res["slide"], res["out"])
                stored = f", {n} proposals stored in dataset {args.dataset!r}"
            except (StoreError, GlomError) as e:
                failures += 1
                print(f"error: {res['slide']}: storing proposals: {e}", file=sys.stderr)
        what = "already done" if res["skipped"] else f"{res['tiles']} tiles, {res['seconds']:.1f} s"
        tqdm.write(f"{res['slide']}: {res['n']} glomeruli ({what}) -> {res['out']}{stored}")

    if workers == 1:
        _worker_init(args.checkpoint, args.device, args.threads)
        for slide in args.slides:
            try:
                done(_worker_detect(slide, {**kwargs, "progress": not args.no_progress, "position": 1}))
            except DetectSlideError as e:
                failures += 1
                tqdm.write(f"error: {e}", file=sys.stderr)
            overall.update(1)
    else:
        ctx = mp.get_context("spawn")  # no forked torch thread pools
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(args.checkpoint, args.device, threads)) as pool:
            futures = {pool.submit(_worker_detect, s, kwargs): s for s in args.slides}
            for fut in as_completed(futures):
                try:
                    done(fut.result())
                except DetectSlideError as e:
                    failures += 1
                    tqdm.write(f"error: {e}", file=sys.stderr)
                except Exception as e:  # noqa: BLE001 - a crashed worker must still name its slide
                    failures += 1
                    tqdm.write(f"error: {futures[fut]}: {type(e).__name__}: {e}", file=sys.stderr)
                overall.update(1)
    overall.close()
    if failures:
        print(f"{failures} of {len(args.slides)} slides failed", file=sys.stderr)
    return 1 if failures else 0


def register(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``train-detector``, ``evaluate-detector``, ``cv-detector`` and ``detect``."""
    parents = list(parents)
    p = subparsers.add_parser("train-detector", parents=parents, help="train the glomerulus detector from a recipe")
    p.add_argument("--recipe", help="recipes/detector/cpu.yaml (defaults for every key otherwise)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.epochs=30 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=_cmd_train_detector)

    p = subparsers.add_parser("evaluate-detector", parents=parents,
                              help="object F1 at IoU 0.5, AP, Dice, count error and overlays for a detector")
    p.add_argument("checkpoint", help="detector checkpoint (.safetensors with its .json)")
    p.add_argument("--data", required=True, help="folder with images/ and masks/ (e.g. $SHARED/glomeruli-tiles)")
    p.add_argument("--data-mpp", type=float, default=0.5, help="µm/px of the images in --data (default 0.5)")
    p.add_argument("--split", default="all", choices=["all", "test", "val", "train"],
                   help="only the tiles of this part of the checkpoint's split (default all)")
    p.add_argument("--out", type=Path, help="report folder (default next to the checkpoint)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-overlays", action="store_true")
    p.set_defaults(func=_cmd_evaluate_detector)

    p = subparsers.add_parser("cv-detector", parents=parents,
                              help="k-fold over the tiles: out-of-fold detector F1, Dice, AP with 95 %% intervals")
    p.add_argument("--recipe", help="recipes/detector/cpu.yaml (defaults for every key otherwise)")
    p.add_argument("--folds", type=int, default=4, help="tile groups; each tile is tested once (default 4)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (repeatable)")
    p.add_argument("--out", type=Path, help="CV folder (default runs/<name>-cv)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of the tiles for the intervals")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_cv_detector)

    p = subparsers.add_parser("detect", parents=parents,
                              help="find every glomerulus in whole slides (QuPath GeoJSON, store proposals)")
    p.add_argument("slides", nargs="+", metavar="SLIDE")
    p.add_argument("--checkpoint", required=True, help="detector checkpoint (glom train-detector)")
    p.add_argument("--out", default="detections", help="<out>/<slide>.geojson (default ./detections)")
    p.add_argument("--mpp", type=float, help="µm per level-0 pixel for slides that do not record it")
    p.add_argument("--dataset", help="also store the findings as proposals on the slide in this dataset")
    p.add_argument("--workers", type=int, default=1, help="slides in parallel (processes)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--tile-px", type=int, help="inference tile side at the working µm/px (default 512)")
    p.add_argument("--overlap-px", type=int, help="tile overlap (default 64)")
    p.add_argument("--batch-size", type=int, help="tiles per forward pass (default 8)")
    p.add_argument("--threshold", type=float, help="probability threshold (default: the checkpoint's)")
    p.add_argument("--min-area-um2", type=float, help="drop findings smaller than this (default: the checkpoint's)")
    p.add_argument("--no-resume", action="store_true", help="detect again even where a result exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_detect)
