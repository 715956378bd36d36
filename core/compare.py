"""``glom compare``: several architectures trained on the same split, one comparison table.

The first run's ``split.json`` is reused by every other run, so all models see the same images;
the table has the columns the seed papers report (accuracy, precision, recall, F1) plus macro AUC,
balanced accuracy, parameter count and training time.
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

__all__ = ["compare_architectures", "comparison_table"]

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
