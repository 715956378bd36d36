"""``glom train-detector``, ``glom evaluate-detector``, ``glom cv-detector``, ``glom detect`` and
``glom classify-slides`` (the crop + classify step after detection, :mod:`core.slide_classify`).

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
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
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

    if args.rescore:
        return _rescore_cv(args)
    try:
        cfg = load_detector_config(args.recipe, args.overrides)
        res = run_detector_cv(cfg, args.folds, out_dir=args.out, bootstrap=args.bootstrap,
                              progress=not args.no_progress, overlays=not args.no_overlays)
    except (ConfigError, GlomError, OSError) as e:
        return _error(str(e))
    print("\n".join(summary_lines(res.report)))
    print(f"report, per-tile CSV, overlays and the fold runs in {res.out_dir}")
    return 0


def _rescore_cv(args: argparse.Namespace) -> int:
    """``--rescore CV_DIR``: the finished folds scored again with ``postprocess.*`` overrides."""
    from core.config import ConfigError
    from core.detection.config import load_detector_config
    from core.detection.cv import pooled_table, rescore_detector_cv

    recipe = Path(args.rescore) / "fold-0" / "config.yaml"
    try:
        if not recipe.is_file():
            raise GlomError(f"{args.rescore}: no fold-0/config.yaml: not a cv-detector folder")
        wrong = [o for o in args.overrides if not o.startswith("postprocess.")]
        if wrong:
            raise ConfigError(f"--rescore changes post-processing only (postprocess.<key>=...), not {', '.join(wrong)}")
        base = load_detector_config(recipe).postprocess.__dict__
        new = load_detector_config(recipe, args.overrides).postprocess.__dict__
        overrides = {k: v for k, v in new.items() if v != base[k]}
        out = rescore_detector_cv(args.rescore, overrides, bootstrap=args.bootstrap, retune=args.retune)
    except (ConfigError, GlomError, OSError) as e:
        return _error(str(e))
    print(f"out of fold, {overrides or 'as trained'}" + (", threshold / min_score chosen again on each fold's "
                                                        f"validation tiles: {out['chosen_per_fold']}" if args.retune else ""))
    print("\n".join(pooled_table(out["pooled"], {"fixed": "recipe's fixed + these settings",
                                                 "chosen": "each fold's " + ("chosen again" if args.retune else "chosen")})))
    return 0


# --- glom detect ----------------------------------------------------------------------------------

def _cmd_detect(args: argparse.Namespace) -> int:
    from annotation_db.db import open_store, resolve_url
    from core.checkpoint import CheckpointError
    from core.detection.inference import resolve_device
    from core.detection.model import read_detector_meta
    from core.detection.slide_job import (
        DetectJob,
        describe,
        detect_and_store,
    )
    from core.detection.slides import (
        DetectSettings,
        DetectSlideError,
        checkpoint_digest,
    )

    if args.ray and args.workers > 1:
        return _error("--workers runs local processes; with --ray there is one Ray task per slide (drop --workers)")
    for flag, v in (("--threshold", args.threshold), ("--min-score", args.min_score)):
        if v is not None and not 0.0 <= v <= 1.0:
            return _error(f"{flag} is a probability, 0 to 1 (got {v})")
    try:
        meta = read_detector_meta(args.checkpoint)
        digest = checkpoint_digest(args.checkpoint)
        if not args.ray:  # on Ray the workers' devices count, not this machine's
            resolve_device(args.device)
    except (CheckpointError, GlomError, OSError) as e:
        return _error(str(e))
    missing = [s for s in args.slides if not Path(s).is_file()]
    if missing and not args.ray:  # on Ray a task names the slide its node does not see; the others go on
        return _error(f"no such slide file: {', '.join(missing)}")
    settings = DetectSettings.from_meta(meta, tile_px=args.tile_px, overlap_px=args.overlap_px,
                                        batch_size=args.batch_size, threshold=args.threshold,
                                        min_area_um2=args.min_area_um2, min_score=args.min_score, tta=args.tta)
    if settings.tile_px % 32 or settings.overlap_px >= settings.tile_px:
        return _error(f"--tile-px must be a multiple of 32 larger than --overlap-px (got {settings.tile_px}, "
                      f"{settings.overlap_px})")
    db_url = None
    if args.dataset:
        db_url = _absolute_sqlite(resolve_url(args.db))  # workers run elsewhere, in another folder
        try:
            open_store(db_url)  # migrate once here: workers only check the schema
        except StoreError as e:
            return _error(str(e))
    stem = Path(args.checkpoint).with_suffix("")
    workers = max(1, min(args.workers, len(args.slides)))
    job = DetectJob(weights=str(stem.absolute().with_suffix(".safetensors")), checkpoint=str(stem), digest=digest,
                    settings=settings, out_dir=str(Path(args.out).absolute()), source=f"model:{stem.name}",
                    slide_mpp=args.mpp, resume=not args.no_resume, device=args.device,
                    threads=args.threads if workers == 1 else args.threads or max(1, (os.cpu_count() or 1) // workers),
                    dataset=args.dataset, db_url=db_url)
    slides = [os.path.abspath(s) for s in args.slides] if args.ray else list(args.slides)
    from core.detection.cluster import detect_on_ray

    return _run_slides(slides, job, detect_and_store, on_ray=detect_on_ray, describe_one=describe,
                       errors=DetectSlideError, args=args, workers=workers,
                       in_process={"progress": not args.no_progress, "position": 1})


# --- glom classify-slides -------------------------------------------------------------------------

def _cmd_classify_slides(args: argparse.Namespace) -> int:
    from annotation_db import store
    from annotation_db.db import open_store, resolve_url
    from core.checkpoint import CheckpointError
    from core.detection.inference import resolve_device
    from core.slide_classify import (
        ClassifyJob,
        ClassifySlideError,
        check_classes,
        classify_slide,
        describe,
    )

    if args.ray and args.workers > 1:
        return _error("--workers runs local processes; with --ray there is one Ray task per slide (drop --workers)")
    weights = Path(args.checkpoint).with_suffix(".safetensors").absolute()
    db_url = _absolute_sqlite(resolve_url(args.db))  # workers run elsewhere, in another folder
    try:
        Session = open_store(db_url)  # migrate once here: workers only check the schema
        with Session() as s:
            ds = store.get_dataset(s, args.dataset)
            check_classes(weights, ds.class_keys, ds.name)
            if not ds.root and args.out is None:
                return _error(f"dataset {ds.name!r} has no root folder for the crops: pass --out")
        if not args.ray:  # on Ray the workers' devices count, not this machine's
            resolve_device(args.device)
    except (CheckpointError, GlomError, OSError) as e:
        return _error(str(e))
    job = ClassifyJob(checkpoint=str(weights), dataset=args.dataset, db_url=db_url, mpp=args.mpp,
                      out_dir=str(Path(args.out).absolute()) if args.out else None, annotator=args.annotator,
                      threads=args.threads, device=args.device)
    # a path made absolute (workers run elsewhere, in another folder); a bare slide name stays a name
    slides = [os.path.abspath(s) if Path(s).is_file() or "/" in s or Path(s).suffix else s for s in args.slides]
    workers = max(1, min(args.workers, len(slides)))
    if workers > 1:
        job = replace(job, threads=args.threads or max(1, (os.cpu_count() or 1) // workers))
    from core.slide_classify import classify_on_ray

    return _run_slides(slides, job, classify_slide, on_ray=classify_on_ray, describe_one=describe,
                       errors=ClassifySlideError, args=args, workers=workers)


def _run_slides(slides: list[str], job: Any, run_one: Callable[..., Any], *, on_ray: Callable[..., Any],
                describe_one: Callable[[Any, str | None], str], errors: type[Exception] | tuple[type[Exception], ...],
                args: argparse.Namespace, workers: int, in_process: dict[str, Any] | None = None) -> int:
    """The per-slide loop of ``detect`` and ``classify-slides``: ``run_one(slide, job)`` in this process,
    in ``workers`` local processes, or one Ray task per slide (``--ray``, ``on_ray``); a line per slide,
    every failure named and the others go on; exit status 1 if any slide failed."""
    from tqdm import tqdm

    failures = 0
    overall = tqdm(total=len(slides), desc="slides", unit="slide", disable=args.no_progress)

    def report(outcome: Any, error: str | None, node: str = "") -> None:
        nonlocal failures
        if error is not None:
            failures += 1
            tqdm.write(f"error: {error}", file=sys.stderr)
        else:
            tqdm.write(describe_one(outcome, args.dataset) + (f" [{node}]" if node else ""))
        overall.update(1)

    if args.ray:
        from core.detection.cluster import RayClusterError

        try:
            for r in on_ray(job, slides, address=args.ray, num_cpus=args.threads or 1):
                report(r.value, r.error, r.node)
        except RayClusterError as e:
            overall.close()
            return _error(str(e))
    elif workers == 1:
        for slide in slides:
            try:
                report(run_one(slide, job, **(in_process or {})), None)
            except errors as e:
                report(None, str(e))
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:  # no forked torch pools
            futures = {pool.submit(run_one, s, job): s for s in slides}
            for fut in as_completed(futures):
                try:
                    report(fut.result(), None)
                except errors as e:
                    report(None, str(e))
                except Exception as e:  # noqa: BLE001 - a crashed worker must still name its slide
                    report(None, f"{futures[fut]}: {type(e).__name__}: {e}")
    overall.close()
    if failures:
        print(f"{failures} of {len(slides)} slides failed", file=sys.stderr)
    return 1 if failures else 0


def _absolute_sqlite(url: str) -> str:
    """An SQLite URL with an absolute file path (a relative one would resolve in each worker's own folder)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return url
    return u.set(database=str(Path(u.database).expanduser().absolute())).render_as_string(hide_password=False)


def register(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``train-detector``, ``evaluate-detector``, ``cv-detector``, ``detect`` and ``classify-slides``."""
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
    p.add_argument("--rescore", type=Path, metavar="CV_DIR",
                   help="score a finished CV again with --set postprocess.<key>=... (no training)")
    p.add_argument("--retune", action="store_true",
                   help="with --rescore: choose threshold / min_score again on each fold's validation tiles")
    p.set_defaults(func=_cmd_cv_detector)

    p = subparsers.add_parser("detect", parents=parents,
                              help="find every glomerulus in whole slides (QuPath GeoJSON, store proposals)")
    p.add_argument("slides", nargs="+", metavar="SLIDE")
    p.add_argument("--checkpoint", required=True, help="detector checkpoint (glom train-detector)")
    p.add_argument("--out", default="detections", help="<out>/<slide>.geojson (default ./detections)")
    p.add_argument("--mpp", type=float, help="µm per level-0 pixel for slides that do not record it")
    p.add_argument("--dataset", help="also store the findings as proposals on the slide in this dataset")
    p.add_argument("--workers", type=int, default=1, help="slides in parallel (processes)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: cores / workers); with --ray, CPUs per task (default 1)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="one task per slide on an existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto); "
                        "slides, checkpoint and --out on storage every node sees (docs/DETECTION.md)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--tile-px", type=int, help="inference tile side at the working µm/px (default 512)")
    p.add_argument("--overlap-px", type=int, help="tile overlap (default 64)")
    p.add_argument("--batch-size", type=int, help="tiles per forward pass (default 8)")
    p.add_argument("--threshold", type=float, help="probability threshold (default: the checkpoint's)")
    p.add_argument("--min-area-um2", type=float, help="drop findings smaller than this (default: the checkpoint's)")
    p.add_argument("--min-score", type=float,
                   help="drop findings whose mean probability is below this (default: the checkpoint's)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mean of the four flips of each tile, 4x the forward cost (default: the checkpoint's)")
    p.add_argument("--no-resume", action="store_true", help="detect again even where a result exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_detect)

    p = subparsers.add_parser("classify-slides", parents=parents,
                              help="crop each slide's stored glomeruli into a dataset and classify them (resumable)")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files (or names of slides the store has a path for)")
    p.add_argument("--dataset", required=True, help="the dataset the crops go into (its classes: the classifier's)")
    p.add_argument("--checkpoint", required=True, help="classifier checkpoint (glom train): .safetensors with its .json")
    p.add_argument("--out", help="crops' folder (default <dataset root>/wsi)")
    p.add_argument("--mpp", type=float, help="µm per level-0 pixel for slides that record none (file or store)")
    p.add_argument("--annotator", help="store the boxes' classes as this person's labels (default: no labels)")
    p.add_argument("--workers", type=int, default=1, help="slides in parallel (processes)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: cores / workers); with --ray, CPUs per task (default 1)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="one task per slide on an existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto); "
                        "PostgreSQL store, slides, checkpoint and crops on storage every node sees")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present) | cpu | cuda | cuda:N; with --ray, a GPU per task when the cluster has them")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_classify_slides)
