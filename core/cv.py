"""Grouped cross-validation and leave-one-centre-out: how a recipe does on slides and centres it never saw.

    glom cv --recipe recipes/glomerulus_robust.yaml                       # 5-fold, grouped by slide
    glom cv --recipe R --scheme loco [--adapt-slides 2]                   # leave one centre out
    glom cv --recipe R --folds 5 --group-by patient --ensemble            # + one bundled checkpoint

Every fold is an ordinary training run (``runs/<name>-<scheme>/<fold>/``, its own ``split.json`` with
no slide on two sides, a validation part carved by slide from the training side for early
stopping and temperature). The run's own evaluation predicts the held-out crops (with TTA when
the recipe asks); those logits are kept as out-of-fold predictions (``oof_predictions.csv``). The figures
(macro-F1, balanced accuracy, per-class recall, macro AUC, ECE) are computed on all out-of-fold
predictions together, each with a 95 % interval from a bootstrap over slides, then per fold (per
centre for ``loco``); a per-slide error table says where the errors are.

``--ensemble`` (k-fold only) saves the k fold models as one checkpoint (``ensemble.safetensors``
+ ``.json``) whose temperature is fitted on the out-of-fold logits: ``glom predict``, the viewer
and the labeling app load it like any checkpoint.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import TrainConfig
from core.labeled_sets import DataError, LabeledSet, Sample
from core.splits import Split, kfold_grouped, split_grouped
from core.intervals import HEADLINE, bootstrap_metrics, format_ci
from core.metrics import fit_temperature, plot_confusion_matrix, plot_reliability, plot_roc, softmax

log = logging.getLogger(__name__)

__all__ = ["CVFold", "CVResult", "plan_folds", "run_cv", "predict_samples", "refit_on_slides", "summary_lines",
           "SCHEMES"]

SCHEMES = ("kfold", "loco")


@dataclass
class CVFold:
    """One fold: its name (``fold0``, ``centre-SAS``), the split, and what it holds out."""

    name: str
    split: Split
    held_out: list[str]


@dataclass
class CVResult:
    """Where the CV wrote its files, the report, and the bundled checkpoint (if asked)."""

    out_dir: Path
    report: dict[str, Any]
    oof: list[dict[str, Any]]
    ensemble: Path | None = None
    seconds: float = 0.0
    fold_runs: list[Path] = field(default_factory=list)


def plan_folds(ls: LabeledSet, scheme: str = "kfold", folds: int = 5, group_by: str = "slide",
               seed: int = 0, val_fraction: float = 0.2) -> list[CVFold]:
    """The folds of ``scheme``: ``kfold`` (stratified, grouped by ``group_by``) or ``loco`` (one
    fold per centre). Validation is carved from each fold's training side, grouped by slide."""
    if scheme not in SCHEMES:
        raise DataError(f"CV scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    if scheme == "kfold":
        splits = kfold_grouped(ls, folds, seed, group_by, val_fraction,
                               val_group_by="slide" if group_by == "centre" else None)
        return [CVFold(f"fold{s.fold}", s, s.groups.get("test", [])) for s in splits]
    centres = sorted({s.centre for s in ls.samples if s.centre})
    ls.groups("centre")  # every crop must have a centre: the error says how to give them
    if len(centres) < 2:
        raise DataError(f"leave-one-centre-out needs at least 2 centres, found {centres}")
    out = []
    for i, c in enumerate(centres):
        rest = LabeledSet(ls.classes, [s for s in ls.samples if s.centre != c], ls.display_names, ls.source)
        test = [s.path for s in ls.samples if s.centre == c]
        inner = split_grouped(rest, (1 - val_fraction, val_fraction), seed + i, "slide")
        groups = {"train": sorted({f"centre:{s.centre}" for s in rest.samples}), "val": inner.groups.get("test", []),
                  "test": [f"centre:{c}"]}
        split = Split(inner.train, inner.test, test, seed, [1 - val_fraction, val_fraction], "centre",
                      fold=i, n_folds=len(centres), groups=groups)
        out.append(CVFold(f"centre-{c}", split, [c]))
    return out


def predict_samples(checkpoint: str | Path, samples: Sequence[Sample], tta: bool | None = None,
                    batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """Raw logits (N, C) of a checkpoint on ``samples`` (its own TTA setting unless ``tta`` is given)."""
    from core.engine import make_step_context, predict
    from core.evaluate import make_eval_loader
    from core.predict import Predictor

    pred = Predictor.from_checkpoint(checkpoint, device)
    loader = make_eval_loader(samples, pred.meta.preprocess, pred.stain, batch_size)
    out = predict(pred.model, loader, make_step_context(torch.device(device), amp=False),
                  tta=pred.tta if tta is None else tta, desc="held-out")
    return out["logits"].numpy()


def _fold_report(rows: list[dict[str, Any]], classes: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    probs = np.array([r["probs"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    slides = [r["slide"] for r in rows]
    figs = bootstrap_metrics(probs, labels, slides, classes, n_boot, seed)
    figs["n"] = len(rows)
    figs["slides"] = len({s for s in slides if s})
    figs["counts"] = dict(Counter(classes[r["label"]] for r in rows))
    return figs


def _slide_table(rows: list[dict[str, Any]], classes: list[str]) -> list[dict[str, Any]]:
    """One row per slide: crops, errors, error rate, true and predicted counts; worst first."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["slide"] or "(no slide)"].append(r)
    table = []
    for slide, rs in by.items():
        errors = sum(r["pred"] != r["label"] for r in rs)
        true = Counter(classes[r["label"]] for r in rs)
        pred = Counter(classes[r["pred"]] for r in rs)
        table.append({"slide": slide, "centre": rs[0]["centre"] or "", "fold": rs[0]["fold"], "crops": len(rs),
                      "errors": errors, "error_rate": errors / len(rs),
                      "mean_p_true": float(np.mean([r["probs"][r["label"]] for r in rs])),
                      **{f"true/{c}": true.get(c, 0) for c in classes},
                      **{f"pred/{c}": pred.get(c, 0) for c in classes}})
    table.sort(key=lambda t: (-t["error_rate"], -t["errors"], t["slide"]))
    return table


def _plot_forest(per_fold: dict[str, dict[str, Any]], pooled: dict[str, Any], path: Path,
                 metric: str = "macro_f1") -> Path:
    from core.metrics import _plt, _save

    plt = _plt()
    names = list(per_fold)
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.6))
    for y, name in enumerate(names + ["pooled"]):
        f = (pooled if name == "pooled" else per_fold[name])[metric]
        if f["value"] is None:
            continue
        lo = f["lo"] if f["lo"] is not None else f["value"]
        hi = f["hi"] if f["hi"] is not None else f["value"]
        ax.errorbar(f["value"], y, xerr=[[f["value"] - lo], [hi - f["value"]]], fmt="D" if name == "pooled" else "o",
                    color="black" if name == "pooled" else "tab:blue", capsize=3)
    ax.set_yticks(range(len(names) + 1), names + ["pooled"])
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric.replace('_', ' ')} (95 % CI, bootstrap over slides)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def refit_on_slides(rows: list[dict[str, Any]], classes: list[str], n_slides: int, draws: int = 20,
                    seed: int = 0) -> dict[str, Any] | None:
    """What a small labelled sample at the new site buys: ``draws`` times, take ``n_slides`` of the
    held-out slides as the labelled sample, re-fit the class bias on their (calibrated) predictions
    (:func:`core.adapt.fit_class_bias`) and score the *other* slides as trained and as re-fitted.
    Returns the mean and the 2.5–97.5 % range over draws, or None when there are too few slides.
    """
    from core.adapt import fit_class_bias
    from core.intervals import point_metrics

    slides = sorted({r["slide"] for r in rows if r["slide"]})
    if n_slides <= 0 or len(slides) <= n_slides:
        return None
    rng = np.random.default_rng(seed)
    before, after, sizes = [], [], []
    for _ in range(draws):
        pick = set(rng.choice(slides, n_slides, replace=False).tolist())
        sample = [r for r in rows if r["slide"] in pick]
        rest = [r for r in rows if r["slide"] not in pick]
        z_s = np.log(np.clip([r["probs"] for r in sample], 1e-12, 1))  # calibrated logits, up to a constant
        bias = fit_class_bias(z_s, np.array([r["label"] for r in sample]))
        z_r = np.log(np.clip([r["probs"] for r in rest], 1e-12, 1))
        y_r = np.array([r["label"] for r in rest])
        before.append(point_metrics(softmax(z_r), y_r, classes)["macro_f1"])
        after.append(point_metrics(softmax(z_r + bias), y_r, classes)["macro_f1"])
        sizes.append(len(sample))

    def summary(v: list[float]) -> dict[str, float]:
        return {"value": float(np.mean(v)), "lo": float(np.quantile(v, 0.025)), "hi": float(np.quantile(v, 0.975))}

    return {"slides": n_slides, "draws": draws, "sample_crops": float(np.mean(sizes)),
            "macro_f1_before": summary(before), "macro_f1_after": summary(after)}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _markdown(report: dict[str, Any], classes: list[str], slide_table: list[dict[str, Any]]) -> str:
    scheme = report["scheme"]
    what = ("leave-one-centre-out (trained on the other centres, scored on this one)" if scheme == "loco"
            else f"{report['folds']}-fold cross-validation grouped by {report['group_by']}")
    lines = [f"# {report['name']}: {what}", "",
             f"{report['n']} crops, {report['slides']} slides; every figure on out-of-fold predictions with a "
             f"95 % interval from {report['bootstrap']} bootstrap resamples of slides.", ""]
    figs = ("macro_f1", "balanced_accuracy", *[f"recall/{c}" for c in classes], "macro_auc", "ece")
    header = "| " + ("centre" if scheme == "loco" else "fold") + " | crops | slides | " + " | ".join(
        f.replace("_", " ") for f in figs) + " |"
    lines += [header, "|---" * (len(figs) + 3) + "|"]
    for name, f in [*report["per_fold"].items(), ("**pooled**", report["pooled"])]:
        lines.append(f"| {name} | {f['n']} | {f['slides']} | " + " | ".join(format_ci(f.get(k)) for k in figs) + " |")
    if scheme == "loco":
        worst = min(report["per_fold"].items(), key=lambda kv: kv[1]["macro_f1"]["value"] or 0)
        lines += ["", f"Worst centre: {worst[0]}, macro-F1 {format_ci(worst[1]['macro_f1'])}."]
    refits = {n: f["refit"] for n, f in report["per_fold"].items() if f.get("refit")}
    if refits:
        n = next(iter(refits.values()))["slides"]
        part = "centre" if scheme == "loco" else "fold"
        lines += ["", f"## Operating point re-fitted on {n} labelled slides of the held-out {part}",
                  "", "Reported apart from the figures above: a class bias fitted on the predictions for the "
                  f"sampled slides, scored on the other slides; mean [2.5–97.5 %] over "
                  f"{next(iter(refits.values()))['draws']} random draws of the sample.", "",
                  "| held out | sample crops (mean) | macro-F1 as trained | macro-F1 re-fitted |", "|---|---|---|---|"]
        for name, r in refits.items():
            lines.append(f"| {name} | {r['sample_crops']:.0f} | {format_ci(r['macro_f1_before'])} | "
                         f"{format_ci(r['macro_f1_after'])} |")
    lines += ["", "## Slides with the most errors", "",
              "| slide | centre | fold | crops | errors | error rate | mean p(true class) |", "|---|---|---|---|---|---|---|"]
    for t in slide_table[:15]:
        lines.append(f"| {t['slide']} | {t['centre']} | {t['fold']} | {t['crops']} | {t['errors']} | "
                     f"{t['error_rate']:.2f} | {t['mean_p_true']:.3f} |")
    lines += ["", "Full table: `slide_errors.csv`; predictions: `oof_predictions.csv`.", "", "## Plots", ""]
    lines += [f"![{k}]({v})" for k, v in report["plots"].items()]
    lines += ["", f"Wall time: {report['seconds']:.0f} s ({report['seconds'] / max(len(report['per_fold']), 1):.0f} s "
              f"per fold)."]
    return "\n".join(lines) + "\n"


def _bundle(runs: list[Path], oof_logits: np.ndarray, oof_labels: np.ndarray, out: Path) -> Path:
    """The fold models as one ensemble checkpoint; temperature fitted on the out-of-fold logits."""
    from core.checkpoint import load_checkpoint, save_checkpoint
    from models.ensemble import EnsembleClassifier

    members, metas = zip(*(load_checkpoint(r / "best") for r in runs))
    ens = EnsembleClassifier(list(members))
    meta = copy.deepcopy(metas[0])
    meta.ensemble = len(members)
    meta.temperature = fit_temperature(oof_logits, oof_labels)
    meta.split = {"cv": [m.split for m in metas]}
    meta.metrics = {"members": [str(r / "best.safetensors") for r in runs]}
    meta.epoch = None
    meta.code_revision = ""
    meta.created_at = ""
    return save_checkpoint(ens, out, meta)


def run_cv(cfg: TrainConfig, scheme: str = "kfold", folds: int = 5, group_by: str | None = None,
           progress: bool = True, ensemble: bool = False, adapt_slides: int = 0,
           on_fold: Callable[[str, dict[str, Any]], None] | None = None) -> CVResult:
    """Train one run per fold, predict every held-out crop, and report with intervals."""
    from core.train import run_training
    from core.training_data import load_training_set

    t0 = time.perf_counter()
    group_by = group_by or ("centre" if scheme == "loco" else cfg.data.split.group_by)
    if ensemble and scheme != "kfold":
        raise DataError("--ensemble bundles k-fold models; leave-one-centre-out models each miss a centre")
    ls = load_training_set(cfg)
    plan = plan_folds(ls, scheme, folds, group_by, cfg.data.split.seed)
    out_dir = Path(cfg.output_dir) / f"{cfg.name}-{scheme}"
    k = 2
    while out_dir.exists() and any(out_dir.iterdir()):
        out_dir = Path(cfg.output_dir) / f"{cfg.name}-{scheme}-{k}"
        k += 1
    out_dir.mkdir(parents=True, exist_ok=True)
    by_path = {s.path: s for s in ls.samples}
    classes = ls.classes
    oof: list[dict[str, Any]] = []
    oof_logits: list[np.ndarray] = []
    runs: list[Path] = []
    per_fold: dict[str, dict[str, Any]] = {}
    for fold in plan:
        split_file = out_dir / f"{fold.name}.split.json"
        fold.split.save(split_file)
        run_cfg = copy.deepcopy(cfg)
        run_cfg.name = fold.name
        run_cfg.output_dir = str(out_dir)
        run_cfg.data.split.file = str(split_file)
        run_cfg.evaluate.tsne = False
        log.info("cv %s: training %s (held out: %s)", scheme, fold.name, ", ".join(fold.held_out))
        result = run_training(run_cfg, progress=progress)
        runs.append(result.run_dir)
        test = [by_path[p] for p in fold.split.test]
        # The run's own evaluation already predicted the held-out crops (with TTA when asked), in split order.
        logits = result.logits["test"]
        probs = softmax(logits, result.report.get("temperature") or 1.0)
        rows = []
        for s, z, p in zip(test, logits, probs):
            rows.append({"path": s.path, "slide": s.slide, "centre": s.centre, "fold": fold.name, "label": s.label,
                         "pred": int(p.argmax()), "probs": p.tolist(), "logits": z.tolist()})
        oof += rows
        oof_logits.append(logits)
        per_fold[fold.name] = _fold_report(rows, classes, cfg.evaluate.bootstrap, cfg.seed)
        per_fold[fold.name]["run"] = str(result.run_dir)
        per_fold[fold.name]["held_out"] = fold.held_out
        per_fold[fold.name]["refit"] = refit_on_slides(rows, classes, adapt_slides, seed=cfg.seed)
        if on_fold is not None:
            on_fold(fold.name, per_fold[fold.name])
        log.info("cv %s: %s macro-F1 %s", scheme, fold.name, format_ci(per_fold[fold.name]["macro_f1"]))

    pooled = _fold_report(oof, classes, cfg.evaluate.bootstrap, cfg.seed)
    probs = np.array([r["probs"] for r in oof])
    labels = np.array([r["label"] for r in oof])
    from core.metrics import classification_metrics

    full = classification_metrics(probs, labels, classes)
    plots = {"confusion matrix (out of fold)": plot_confusion_matrix(
        full["confusion_matrix"], classes, out_dir / "confusion_matrix.png", "Confusion matrix (out of fold)").name}
    if full["roc"]:
        plots["ROC (out of fold)"] = plot_roc(full, out_dir / "roc.png").name
    plots["reliability (out of fold)"] = plot_reliability({"calibrated per fold": full["calibration"]},
                                                          out_dir / "reliability.png").name
    plots["macro-F1 per " + ("centre" if scheme == "loco" else "fold")] = _plot_forest(
        per_fold, pooled, out_dir / "forest.png").name
    slide_table = _slide_table(oof, classes)
    _write_csv(out_dir / "slide_errors.csv", slide_table)
    _write_csv(out_dir / "oof_predictions.csv", [
        {"path": r["path"], "slide": r["slide"] or "", "centre": r["centre"] or "", "fold": r["fold"],
         "label": classes[r["label"]], "predicted": classes[r["pred"]],
         **{f"p/{c}": round(p, 6) for c, p in zip(classes, r["probs"])},
         **{f"logit/{c}": round(z, 6) for c, z in zip(classes, r["logits"])}} for r in oof])
    bundle = None
    if ensemble:
        bundle = _bundle(runs, np.concatenate(oof_logits), labels, out_dir / "ensemble")
    report = {"name": cfg.name, "scheme": scheme, "folds": len(plan), "group_by": group_by, "classes": classes,
              "n": len(oof), "slides": pooled["slides"], "bootstrap": cfg.evaluate.bootstrap,
              "tta": cfg.evaluate.tta, "pooled": pooled, "per_fold": per_fold,
              "confusion_matrix": full["confusion_matrix"], "plots": plots,
              "ensemble": str(bundle) if bundle else None, "data": ls.source,
              "seconds": time.perf_counter() - t0}
    (out_dir / "cv_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out_dir / "cv_report.md").write_text(_markdown(report, classes, slide_table))
    log.info("cv %s done in %.0f s: pooled macro-F1 %s", scheme, report["seconds"], format_ci(pooled["macro_f1"]))
    return CVResult(out_dir, report, oof, bundle, report["seconds"], runs)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What ``glom cv`` prints: one line per fold/centre and the pooled line, headline figures with CIs."""
    unit = "centre" if report["scheme"] == "loco" else "fold"
    lines = []
    for name, f in [*report["per_fold"].items(), ("pooled", report["pooled"])]:
        label = name if name == "pooled" else f"{unit} {name}"
        lines.append(f"{label}: n {f['n']} ({f['slides']} slides), "
                     + ", ".join(f"{k.replace('_', ' ')} {format_ci(f[k])}" for k in HEADLINE))
        if f.get("refit"):
            r = f["refit"]
            lines.append(f"  re-fitted on {r['slides']} labelled slides (~{r['sample_crops']:.0f} crops), other slides: "
                         f"macro f1 {format_ci(r['macro_f1_before'])} as trained -> {format_ci(r['macro_f1_after'])}")
    return lines
