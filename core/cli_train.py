"""``glom train | cv | evaluate | adapt | compare | predict``: argument parsing over core.train and friends.

``register(subparsers)`` adds the subcommands to the ``glom`` parser (core/cli.py), whose ``main``
turns the library's named errors (``GlomError``) into one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
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
        from core.intervals import format_ci

        ci = test.get("intervals") or {}
        r = ci.get("_resampled", {})
        print(f"test: accuracy {test['accuracy']:.4f}, macro-F1 {format_ci(ci.get('macro_f1'))}, "
              f"balanced accuracy {format_ci(ci.get('balanced_accuracy'))} ({test['n']} images, "
              f"{r.get('groups')} {r.get('unit')}s; 95 % intervals by bootstrap over them)")
        print("one split of a few slides is not a headline figure: `glom cv --recipe ...` (grouped k-fold) "
              "or `--scheme loco` (leave one centre out) gives the one to report")
    print(f"wall time: {result.seconds:.0f} s")
    return 0


def _load_eval_samples(args: argparse.Namespace, meta, data: str | None, kind: str | None = None):
    """The labelled crops ``--data`` (or ``--dataset``) names, in the checkpoint's class order."""
    from core.config import config_from_dict
    from core.labeled_sets import assign_centres, load_labeled_set
    from core.training_data import resolve_path

    cfg = config_from_dict(meta.config or {})
    d = cfg.data
    root = getattr(args, "root", None) or ("" if data else d.root)
    ls = load_labeled_set(kind or args.kind or d.kind, resolve_path(data or d.path), resolve_path(root),
                          args.dataset or d.dataset, args.label_source or d.label_source,
                          getattr(args, "db", None) or d.db_url, meta.classes)
    return cfg, assign_centres(ls, d.centre_pattern) if not data else ls


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from core.adapt import adapt_checkpoint
    from core.checkpoint import CheckpointError, load_checkpoint
    from core.devices import resolve_device
    from core.engine import make_step_context
    from core.evaluate import evaluate_model
    from core.intervals import HEADLINE, format_ci
    from core.predict import Predictor
    from core.splits import Split

    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, device)
    ckpt_dir = Path(args.checkpoint).resolve().parent
    cfg, ls = _load_eval_samples(args, meta, args.data)
    if args.data or args.dataset:
        subsets = {"all": ls.samples}
    elif meta.ensemble:
        raise CheckpointError("an ensemble of fold models has seen every crop of its data: evaluate it with --data "
                              "on crops from elsewhere (its honest figures are the CV's out-of-fold ones)")
    else:
        split_file = ckpt_dir / (meta.split or {}).get("file", "split.json")
        if not split_file.is_file():
            raise CheckpointError(f"{split_file} is missing: name the images to evaluate with --data")
        split = Split.load(split_file)
        subsets = {k: v for k, v in split.subsets(ls).items() if k in ("val", "test")}
    adapted = None
    if args.adapt_on:
        _, sample_set = _load_eval_samples(args, meta, args.adapt_on, args.adapt_kind)
        held = {s.path for s in sample_set.samples}
        for name, samples in subsets.items():
            overlap = sum(s.path in held for s in samples)
            if overlap:
                print(f"note: {overlap} crops of {name} are in the adaptation sample and are left out of both reports")
                subsets[name] = [s for s in samples if s.path not in held]
        _, adapted = adapt_checkpoint(args.checkpoint, sample_set.samples, None, args.adapt_on,
                                      bootstrap=cfg.evaluate.bootstrap)
    predictor = Predictor(model, meta, device)
    out = Path(args.out) if args.out else ckpt_dir / "evaluation"
    extra = {"name": cfg.name, "architecture": meta.architecture, "checkpoint": str(args.checkpoint),
             "data": ls.source, "code_revision": meta.code_revision}
    common = dict(temperature=meta.temperature, tta=meta.tta, bootstrap=cfg.evaluate.bootstrap)
    report = evaluate_model(model, meta.classes, meta.preprocess, predictor.stain, subsets, out,
                            make_step_context(device), tsne=not args.no_tsne and not meta.ensemble, extra=extra,
                            class_bias=meta.class_bias, **common)

    def show(rep: dict, title: str) -> None:
        print(title)
        for name, m in rep["splits"].items():
            ci = m["intervals"]
            r = ci["_resampled"]
            print(f"  {name}: n {m['n']} ({r['groups']} {r['unit']}s), "
                  + ", ".join(f"{k.replace('_', ' ')} {format_ci(ci[k])}" for k in HEADLINE))
            print("    recall " + ", ".join(f"{c} {format_ci(ci[f'recall/{c}'])}" for c in meta.classes))

    show(report, "as trained" + (" (with its stored class bias)" if meta.class_bias else "") + ":")
    if adapted is not None:
        report_a = evaluate_model(model, meta.classes, meta.preprocess, predictor.stain, subsets, out / "adapted",
                                  make_step_context(device), tsne=False, extra={**extra, "adapted": adapted},
                                  class_bias=adapted["class_bias"], **common)
        bias = ", ".join(f"{c} {b:+.2f}" for c, b in zip(meta.classes, adapted["class_bias"]))
        show(report_a, f"operating point re-fitted on {adapted['n']} crops of {args.adapt_on} (class bias {bias}):")
        print(f"report (re-fitted): {out / 'adapted' / 'report.md'}")
    print(f"report: {out / 'report.md'}")
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    from core.adapt import adapt_checkpoint
    from core.checkpoint import read_meta
    from core.intervals import format_ci

    meta = read_meta(args.checkpoint)
    _, ls = _load_eval_samples(args, meta, args.data)
    path, rep = adapt_checkpoint(args.checkpoint, ls.samples, args.out, args.data or args.dataset, args.ridge)
    print("class bias: " + ", ".join(f"{c} {b:+.3f}" for c, b in zip(meta.classes, rep["class_bias"])))
    print(f"on the sample itself ({rep['n']} crops; optimistic, judge on other crops with glom evaluate): "
          f"macro-F1 {format_ci(rep['before']['macro_f1'])} -> {format_ci(rep['after']['macro_f1'])}")
    if path:
        print(f"adapted checkpoint: {path}")
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
                    ensemble=args.ensemble, adapt_slides=args.adapt_slides)
    for line in summary_lines(result.report):
        print(line)
    print(f"report: {result.out_dir / 'cv_report.md'}")
    if result.ensemble:
        print(f"ensemble checkpoint: {result.ensemble}")
    print(f"wall time: {result.seconds:.0f} s")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from core.compare import compare_architectures, compare_cv
    from core.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    if args.single_split:
        out_dir, _ = compare_architectures(cfg, args.models, progress=not args.no_progress)
    else:
        out_dir, _ = compare_cv(cfg, args.models, args.scheme, args.folds, args.group_by, progress=not args.no_progress)
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


def register(subparsers: argparse._SubParsersAction,
             parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``train``, ``evaluate``, ``compare`` and ``predict`` to the ``glom`` command."""
    parents = list(parents)
    p = subparsers.add_parser("train", parents=parents, help="train a classifier from a recipe")
    _add_recipe_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("evaluate", parents=parents, help="metrics, calibration and plots for a checkpoint")
    p.add_argument("checkpoint", help="path to best.safetensors (its .json sidecar beside it)")
    p.add_argument("--data", help="evaluate on this CSV/JSONL/folder instead of the run's split")
    p.add_argument("--kind", help="store | folder | csv | jsonl (default: the run's)")
    p.add_argument("--dataset", help="store dataset name")
    p.add_argument("--label-source", help="majority | adjudicated | final | annotator:NAME")
    p.add_argument("--out", help="output folder (default: <run>/evaluation)")
    p.add_argument("--root", help="where the image paths of --data / --adapt-on resolve (default: beside the file)")
    p.add_argument("--adapt-on", metavar="SAMPLE",
                   help="a small labelled sample from the new site: re-fit the operating point on it and "
                        "report those figures separately (its crops are left out of --data)")
    p.add_argument("--adapt-kind", help="csv | jsonl | folder for --adapt-on (default: as --kind)")
    p.add_argument("--no-tsne", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser("adapt", parents=parents,
                              help="re-fit a checkpoint's operating point (class bias) on a labelled sample from a new site")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="the labelled sample (CSV/JSONL/folder)")
    p.add_argument("--kind", help="csv | jsonl | folder (default: the run's)")
    p.add_argument("--dataset", help="store dataset name")
    p.add_argument("--label-source", help="majority | adjudicated | final | annotator:NAME")
    p.add_argument("--root", help="where the sample's image paths resolve (default: beside the file)")
    p.add_argument("--ridge", type=float, default=0.01, help="pull of the bias towards 0 (default 0.01)")
    p.add_argument("--out", help="stem of the adapted checkpoint (weights copied, sidecar with class_bias)")
    p.set_defaults(func=_cmd_adapt)

    p = subparsers.add_parser("cv", parents=parents,
                              help="grouped k-fold or leave-one-centre-out cross-validation, figures with 95 %% CIs")
    _add_recipe_args(p)
    p.add_argument("--scheme", choices=("kfold", "loco"), default="kfold",
                   help="kfold (default) or loco: leave one centre out, each centre scored by a model that never saw it")
    p.add_argument("--folds", type=int, default=5, help="k of k-fold (default 5)")
    p.add_argument("--group-by", choices=("slide", "patient", "centre"),
                   help="what no fold may split (default: the recipe's data.split.group_by; centre for loco)")
    p.add_argument("--bootstrap", type=int, help="slide resamples for the intervals (default: evaluate.bootstrap)")
    p.add_argument("--tta", action="store_true", help="predict held-out crops with the 8 dihedral views")
    p.add_argument("--ensemble", action="store_true", help="also save the k fold models as one checkpoint")
    p.add_argument("--adapt-slides", type=int, default=0, metavar="N",
                   help="also report, separately, each held-out part scored after re-fitting the operating point "
                        "on N of its slides (labelled sample at a new site)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_cv)

    p = subparsers.add_parser("compare", parents=parents,
                              help="several architectures through the same CV, one table with intervals")
    _add_recipe_args(p)
    p.add_argument("--models", nargs="+", required=True, help="timm / custom architecture names")
    p.add_argument("--scheme", choices=("kfold", "loco"), default="kfold")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--group-by", choices=("slide", "patient", "centre"))
    p.add_argument("--single-split", action="store_true",
                   help="one shared train/val/test split instead of CV (quick, but no interval)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_compare)

    p = subparsers.add_parser("predict", parents=parents, help="class probabilities for image files or folders")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", help="write JSON lines here instead of stdout")
    p.add_argument("--uncalibrated", action="store_true", help="ignore the fitted temperature")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_predict)
