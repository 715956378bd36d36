"""``glom compare``: several architectures through the same cross-validation, one comparison table.

By default every architecture runs the same grouped k-fold (or leave-one-centre-out) CV of
:mod:`core.cv` (the folds depend only on the data and the seed, so all models see the same
folds); the table is the seed-003 layout with intervals: architecture, parameters, inference cost
per crop on CPU (and GPU when there is one), training time, and macro-F1 / balanced accuracy /
AUC with 95 % intervals from a bootstrap over slides. ``--single-split`` keeps the old one-split
comparison (the first run's ``split.json`` reused by every other run).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.config import TrainConfig
from core.train import RunResult, run_training

log = logging.getLogger(__name__)

__all__ = ["compare_architectures", "comparison_table", "compare_cv", "cv_comparison_table", "inference_cost"]

_COLUMNS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc")


def comparison_table(rows: Sequence[dict[str, Any]], split: str = "test") -> str:
    """Markdown table, one row per model, best value of each metric in bold."""
    header = "| model | params (M) | " + " | ".join(c.replace("_", " ") for c in _COLUMNS) + " | train time (s) |"
    lines = [header, "|---" * (len(_COLUMNS) + 3) + "|"]
    best = {c: max((r[c] for r in rows if r.get(c) is not None), default=None) for c in _COLUMNS}
    for r in rows:
        cells = []
        for c in _COLUMNS:
            v = r.get(c)
            s = "–" if v is None else f"{v:.4f}"
            cells.append(f"**{s}**" if v is not None and v == best[c] and len(rows) > 1 else s)
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | " + " | ".join(cells)
                     + f" | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + f"\n\nMetrics on the {split} split; every model trained on the same split.\n"


def compare_architectures(cfg: TrainConfig, architectures: Sequence[str], split: str = "test",
                          progress: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    """Train ``cfg`` once per architecture on one shared split; write ``comparison.md``/``.json``."""
    out_dir = Path(cfg.output_dir) / f"{cfg.name}-compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    split_file = cfg.data.split.file
    for arch in architectures:
        run_cfg: TrainConfig = copy.deepcopy(cfg)
        run_cfg.model.name = arch
        run_cfg.name = f"{cfg.name}-{arch}"
        run_cfg.output_dir = str(out_dir)
        if split_file:
            run_cfg.data.split.file = split_file
        log.info("compare: training %s", arch)
        result: RunResult = run_training(run_cfg, progress=progress)
        if not split_file:
            split_file = str(result.run_dir / "split.json")
        m = result.report["splits"].get(split, {})
        rows.append({"model": arch, "run_dir": str(result.run_dir), "params": result.report.get("parameters", 0),
                     "train_seconds": result.report.get("train_seconds", result.seconds),
                     **{c: m.get(c) for c in _COLUMNS}})
    (out_dir / "comparison.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "comparison.md").write_text(f"# {cfg.name}: architectures compared\n\n" + comparison_table(rows, split))
    return out_dir, rows


def inference_cost(architecture: str, num_classes: int, input_size: int, device: str = "cpu",
                   batch: int = 16, repeats: int = 3) -> float:
    """Milliseconds per crop of one batched forward pass (eval mode, after one warm-up batch)."""
    import time

    import timm
    import torch

    import models  # noqa: F401  (custom architectures)

    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes).eval().to(device)
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    with torch.no_grad():
        model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (repeats * batch) * 1000


def cv_comparison_table(rows: Sequence[dict[str, Any]], scheme: str, folds: int) -> str:
    """Markdown: one row per architecture, figures as value [95 % interval]."""
    from core.intervals import format_ci

    lines = ["| architecture | params (M) | CPU ms/crop | GPU ms/crop | train s/fold | macro-F1 | balanced acc. "
             "| macro AUC | ECE |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gpu = f"{r['gpu_ms']:.2f}" if r.get("gpu_ms") is not None else "–"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['cpu_ms']:.1f} | {gpu} | {r['train_s_per_fold']:.0f} | "
                     + " | ".join(format_ci(r["pooled"][k]) for k in ("macro_f1", "balanced_accuracy", "macro_auc", "ece"))
                     + " |")
    what = "leave-one-centre-out" if scheme == "loco" else f"{folds}-fold grouped cross-validation"
    return ("\n".join(lines) + f"\n\nOut-of-fold figures of {what}, the same folds for every model; 95 % intervals "
            "by bootstrap over slides. Cost: batch of 16 at the recipe's input size.\n")


def compare_cv(cfg: TrainConfig, architectures: Sequence[str], scheme: str = "kfold", folds: int = 5,
               group_by: str | None = None, progress: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    """Run :func:`core.cv.run_cv` once per architecture; write ``comparison.md``/``.json``."""
    import torch

    from core.cv import run_cv

    out_dir = Path(cfg.output_dir) / f"{cfg.name}-compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for arch in architectures:
        run_cfg: TrainConfig = copy.deepcopy(cfg)
        run_cfg.model.name = arch
        run_cfg.name = f"{cfg.name}-{arch}"
        run_cfg.output_dir = str(out_dir)
        log.info("compare: %s through %s CV", arch, scheme)
        result = run_cv(run_cfg, scheme, folds, group_by, progress=progress)
        rep = result.report
        size = cfg.preprocess.input_size or 224
        k = len(rep["classes"])
        first_run = json.loads((result.fold_runs[0] / "report.json").read_text()) if result.fold_runs else {}
        rows.append({"model": arch, "cv_dir": str(result.out_dir), "params": first_run.get("parameters", 0),
                     "cpu_ms": inference_cost(arch, k, size, "cpu"),
                     "gpu_ms": inference_cost(arch, k, size, "cuda") if torch.cuda.is_available() else None,
                     "train_s_per_fold": result.seconds / max(rep["folds"], 1),
                     "pooled": {m: rep["pooled"][m] for m in ("macro_f1", "balanced_accuracy", "macro_auc", "ece")},
                     "per_fold_macro_f1": {n: f["macro_f1"] for n, f in rep["per_fold"].items()}})
    (out_dir / "comparison.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "comparison.md").write_text(f"# {cfg.name}: architectures compared\n\n"
                                           + cv_comparison_table(rows, scheme, folds))
    return out_dir, rows
