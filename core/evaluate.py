"""Evaluating a trained model on its splits: metrics, temperature, plots, report files."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from core.labeled_sets import Sample
from core.torch_data import ImageDataset
from core.engine import StepContext, predict
from core.metrics import (classification_metrics, expected_calibration_error, fit_temperature,
                          plot_confusion_matrix, plot_reliability, plot_roc, plot_tsne, softmax,
                          write_report)
from core.intervals import bootstrap_metrics
from core.transforms import build_eval_transform

log = logging.getLogger(__name__)

__all__ = ["make_eval_loader", "evaluate_model"]


def make_eval_loader(samples: Sequence[Sample], preprocess: dict[str, Any],
                     normalizer: Callable[..., np.ndarray] | None, batch_size: int = 64,
                     num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Deterministic loader over ``samples`` with the inference transform."""
    ds = ImageDataset(samples, build_eval_transform(preprocess), normalizer)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)


def evaluate_model(model: nn.Module, classes: Sequence[str], preprocess: dict[str, Any],
                   normalizer: Callable[..., np.ndarray] | None,
                   subsets: dict[str, Sequence[Sample]], out_dir: str | Path, ctx: StepContext,
                   temperature: float | None = None, calibrate: bool = True, tsne: bool = True,
                   batch_size: int = 64, num_workers: int = 0,
                   extra: dict[str, Any] | None = None, seed: int = 0, tta: bool = False,
                   bootstrap: int = 1000, class_bias: Sequence[float] | None = None,
                   logits_out: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Metrics on every non-empty subset (val, test, ...), temperature fitted on ``val``, plots.

    ``tta`` averages the logits of the 8 dihedral views (what a checkpoint with ``tta`` predicts).
    Each subset also gets ``intervals``: the headline figures of the calibrated predictions (with
    ``class_bias`` added when given) with 95 % intervals from ``bootstrap`` resamples of slides.
    ``logits_out``, when given, receives each subset's raw logits (in ``subsets`` order).

    Writes ``report.json``, ``report.md`` and PNGs into ``out_dir``; returns the report.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for name, samples in subsets.items():
        if samples:
            loader = make_eval_loader(samples, preprocess, normalizer, batch_size, num_workers,
                                      ctx.device.type == "cuda")
            outputs[name] = predict(model, loader, ctx, features=tsne, progress=True, desc=name, tta=tta)
            if logits_out is not None:
                logits_out[name] = outputs[name]["logits"].numpy()
    if temperature is None and calibrate and "val" in outputs:
        temperature = fit_temperature(outputs["val"]["logits"].numpy(), outputs["val"]["labels"].numpy())
        log.info("temperature fitted on val: %.3f", temperature)
    report: dict[str, Any] = {**(extra or {}), "temperature": temperature, "splits": {}, "plots": {}}
    for name, out in outputs.items():
        logits, labels = out["logits"].numpy(), out["labels"].numpy()
        m = classification_metrics(softmax(logits), labels, classes)
        if temperature is not None:
            m["calibration_temperature"] = expected_calibration_error(softmax(logits, temperature), labels)
        z = logits / (temperature or 1.0) + (np.asarray(class_bias) if class_bias is not None else 0.0)
        m["intervals"] = bootstrap_metrics(softmax(z), labels, [s.slide for s in subsets[name]], classes,
                                           bootstrap, seed)
        report["splits"][name] = m
    final = "test" if "test" in outputs else next(iter(outputs), None)
    if final is not None:
        m = report["splits"][final]
        plots = report["plots"]
        plots[f"confusion matrix ({final})"] = plot_confusion_matrix(
            m["confusion_matrix"], classes, out_dir / "confusion_matrix.png", f"Confusion matrix ({final})").name
        if m["roc"]:
            plots[f"ROC ({final})"] = plot_roc(m, out_dir / "roc.png").name
        cals = {"raw": m["calibration"]}
        if "calibration_temperature" in m:
            cals[f"T={temperature:.2f}"] = m["calibration_temperature"]
        plots[f"reliability ({final})"] = plot_reliability(cals, out_dir / "reliability.png").name
        if tsne:
            labels = outputs[final]["labels"].numpy()
            panels = {}
            if normalizer is not None:
                raw_loader = make_eval_loader(subsets[final], preprocess, None, batch_size, num_workers)
                raw = predict(model, raw_loader, ctx, features=True, desc=f"{final} (no stain norm.)")
                panels["before stain normalisation"] = (raw["features"].numpy(), labels)
                panels["after stain normalisation"] = (outputs[final]["features"].numpy(), labels)
            else:
                panels["penultimate features"] = (outputs[final]["features"].numpy(), labels)
            plots[f"t-SNE ({final})"] = plot_tsne(panels, classes, out_dir / "tsne.png", seed).name
    for m in report["splits"].values():
        m.pop("roc", None)  # curves are in the PNG; keep report.json readable
    write_report(out_dir, report, classes)
    return report
