"""``glom train | cv | evaluate | adapt | compare | predict``: argument parsing over core.train and friends.

``register(subparsers)`` adds the subcommands to the ``glom`` parser (core/cli.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["register"]


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipes/*.yaml (defaults for every key otherwise)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.lr=3e-4 (repeatable)")


def _cmd_train(args: argparse.Namespace) -> int:
    from core.config import load_config
    from core.train import run_training

    cfg = load_config(args.recipe, args.overrides)
    if getattr(args, "db", None) and not cfg.data.db_url:
        cfg.data.db_url = args.db
    result = run_training(cfg, progress=not args.no_progress)
    test = result.report.get("splits", {}).get("test", {})
    print(f"run: {result.run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    if test:
        print(f"test: accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}, "
              f"balanced accuracy {test['balanced_accuracy']:.4f} ({test['n']} images)")
    print(f"wall time: {result.seconds:.0f} s")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from core.checkpoint import load_checkpoint
    from core.config import config_from_dict
    from core.data import Split, load_labeled_set
    from core.engine import make_step_context
    from core.evaluate import evaluate_model
    from core.predict import Predictor
    from core.train import resolve_path

    import torch

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_checkpoint(args.checkpoint, device)
    ckpt_dir = Path(args.checkpoint).resolve().parent
    cfg = config_from_dict(meta.config or {})
    d = cfg.data
    ls = load_labeled_set(args.kind or d.kind, resolve_path(args.data or d.path), resolve_path(d.root),
                          args.dataset or d.dataset, args.label_source or d.label_source, getattr(args, "db", None) or d.db_url,
                          meta.classes)
    if args.data or args.dataset:
        subsets = {"all": ls.samples}
    else:
        split = Split.load(ckpt_dir / (meta.split or {}).get("file", "split.json"))
        subsets = {k: v for k, v in split.subsets(ls).items() if k in ("val", "test")}
    predictor = Predictor(model, meta, device)
    out = Path(args.out) if args.out else ckpt_dir / "evaluation"
    report = evaluate_model(model, meta.classes, meta.preprocess, predictor.stain, subsets, out,
                            make_step_context(device), temperature=meta.temperature,
                            tsne=not args.no_tsne,
                            extra={"name": cfg.name, "architecture": meta.architecture,
                                   "checkpoint": str(args.checkpoint), "data": ls.source,
                                   "code_revision": meta.code_revision})
    for name, m in report["splits"].items():
        print(f"{name}: n {m['n']}, accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}")
    print(f"report: {out / 'report.md'}")
    return 0


def _cmd_cv(args: argparse.Namespace) -> int:
    from core.config import load_config
    from core.cv import run_cv, summary_lines

    cfg = load_config(args.recipe, args.overrides)
    if getattr(args, "db", None) and not cfg.data.db_url:
        cfg.data.db_url = args.db
    if args.bootstrap is not None:
        cfg.evaluate.bootstrap = args.bootstrap
    if args.tta:
        cfg.evaluate.tta = True
    result = run_cv(cfg, args.scheme, args.folds, args.group_by, progress=not args.no_progress,
                    ensemble=args.ensemble)
    for line in summary_lines(result.report):
        print(line)
    print(f"report: {result.out_dir / 'cv_report.md'}")
    if result.ensemble:
        print(f"ensemble checkpoint: {result.ensemble}")
    print(f"wall time: {result.seconds:.0f} s")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from core.compare import compare_architectures
    from core.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    out_dir, _ = compare_architectures(cfg, args.models, progress=not args.no_progress)
    print((out_dir / "comparison.md").read_text())
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from core.predict import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, args.device)
    paths: list[Path] = []
    for p in map(Path, args.images):
        paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff")) \
            if p.is_dir() else [p]
    results = predictor.predict_paths(paths, calibrated=not args.uncalibrated)
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in results)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"{len(results)} predictions written to {args.out}")
    else:
        sys.stdout.write(text + "\n")
    return 0


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the library's named errors into one ``error:`` line and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from core.checkpoint import CheckpointError
        from core.config import ConfigError
        from core.data import DataError
        from core.losses import LossConfigError
        from core.model_factory import ModelConfigError, PretrainedUnavailableError
        from core.stain import StainError
        from annotation_db.db import StoreError
        from core.engine import TrainingDivergedError
        from core.train import TrainingConfigError
        from core.transforms import TransformError
        from models.freeze import FreezeError

        try:
            return func(args)
        except (CheckpointError, ConfigError, DataError, LossConfigError, ModelConfigError,
                PretrainedUnavailableError, StainError, TrainingConfigError, FreezeError, StoreError,
                TrainingDivergedError, TransformError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    run.__name__ = func.__name__
    return run


def register(subparsers: argparse._SubParsersAction,
             parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``train``, ``evaluate``, ``compare`` and ``predict`` to the ``glom`` command."""
    parents = list(parents)
    p = subparsers.add_parser("train", parents=parents, help="train a classifier from a recipe")
    _add_recipe_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=_guarded(_cmd_train))

    p = subparsers.add_parser("evaluate", parents=parents, help="metrics, calibration and plots for a checkpoint")
    p.add_argument("checkpoint", help="path to best.safetensors (its .json sidecar beside it)")
    p.add_argument("--data", help="evaluate on this CSV/JSONL/folder instead of the run's split")
    p.add_argument("--kind", help="store | folder | csv | jsonl (default: the run's)")
    p.add_argument("--dataset", help="store dataset name")
    p.add_argument("--label-source", help="majority | adjudicated | annotator:NAME")
    p.add_argument("--out", help="output folder (default: <run>/evaluation)")
    p.add_argument("--no-tsne", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_guarded(_cmd_evaluate))

    p = subparsers.add_parser("cv", parents=parents,
                              help="grouped k-fold or leave-one-centre-out cross-validation, figures with 95 % CIs")
    _add_recipe_args(p)
    p.add_argument("--scheme", choices=("kfold", "loco"), default="kfold",
                   help="kfold (default) or loco: leave one centre out, each centre scored by a model that never saw it")
    p.add_argument("--folds", type=int, default=5, help="k of k-fold (default 5)")
    p.add_argument("--group-by", choices=("slide", "patient", "centre"),
                   help="what no fold may split (default: the recipe's data.split.group_by; centre for loco)")
    p.add_argument("--bootstrap", type=int, help="slide resamples for the intervals (default: evaluate.bootstrap)")
    p.add_argument("--tta", action="store_true", help="predict held-out crops with the 8 dihedral views")
    p.add_argument("--ensemble", action="store_true", help="also save the k fold models as one checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_guarded(_cmd_cv))

    p = subparsers.add_parser("compare", parents=parents, help="train several architectures on one split, compare")
    _add_recipe_args(p)
    p.add_argument("--models", nargs="+", required=True, help="timm / custom architecture names")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_guarded(_cmd_compare))

    p = subparsers.add_parser("predict", parents=parents, help="class probabilities for image files or folders")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", help="write JSON lines here instead of stdout")
    p.add_argument("--uncalibrated", action="store_true", help="ignore the fitted temperature")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_guarded(_cmd_predict))
