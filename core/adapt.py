"""Re-fitting the operating point for a new site on a small labelled sample, without retraining.

A model moved to another hospital often keeps its ranking (AUC) while its decision threshold
drifts: the class balance of the new biopsies and the stain shift the logits. Rather than retrain,
:func:`fit_class_bias` fits one additive bias per class to the calibrated logits (a threshold
for two classes; "prior shift" in general) by minimising the negative log-likelihood on a few dozen
labelled crops from the new site, with a small ridge penalty towards zero.

    glom adapt runs/robust/best.safetensors --data site_b_sample.csv --out runs/robust/site_b
    glom evaluate runs/robust/best.safetensors --data site_b_rest.csv --adapt-on site_b_sample.csv

The adapted checkpoint is the same weights with ``class_bias`` and ``adapted`` (sample, size,
counts, figures before and after) in its sidecar; :class:`core.predict.Predictor` applies it.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.labeled_sets import DataError, Sample

log = logging.getLogger(__name__)

__all__ = ["fit_class_bias", "adapt_checkpoint", "MIN_SAMPLE"]

MIN_SAMPLE = 10  # fewer labelled crops than this cannot say where a threshold lies


def fit_class_bias(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                   ridge: float = 0.01, max_iter: int = 200) -> np.ndarray:
    """Bias ``b`` (C,), mean zero, minimising NLL of ``softmax(logits / T + b)`` + ``ridge·|b|²``."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([b], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        c = b - b.mean()
        loss = torch.nn.functional.cross_entropy(z + c, y) + ridge * (c ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    out = (b - b.mean()).detach().numpy()
    if not np.all(np.isfinite(out)):
        raise DataError("the class bias did not converge on this sample")
    return out


def adapt_checkpoint(checkpoint: str | Path, sample: Sequence[Sample], out: str | Path | None = None,
                     source: str = "", ridge: float = 0.01, bootstrap: int = 1000) -> tuple[Path | None, dict[str, Any]]:
    """Fit the class bias of ``checkpoint`` on ``sample``; save an adapted copy at ``out`` when given.

    Returns the adapted weights path (or None) and a report: the bias and the sample's figures
    before and after (on the sample itself: optimistic by construction; judge on other crops).
    """
    from core.checkpoint import read_meta
    from core.cv import predict_samples
    from core.intervals import bootstrap_metrics
    from core.metrics import softmax

    meta = read_meta(checkpoint)
    if len(sample) < MIN_SAMPLE:
        raise DataError(f"{len(sample)} labelled crops are too few to re-fit an operating point "
                        f"(at least {MIN_SAMPLE}, better 30+ with every class present)")
    counts = Counter(meta.classes[s.label] for s in sample)
    missing = [c for c in meta.classes if not counts.get(c)]
    if missing:
        log.warning("the adaptation sample has no crop of %s: their bias is held near 0 only by the penalty", missing)
    logits = predict_samples(checkpoint, sample)
    labels = np.array([s.label for s in sample])
    t = float(meta.temperature or 1.0)
    bias = fit_class_bias(logits, labels, t, ridge)
    slides = [s.slide for s in sample]
    before = bootstrap_metrics(softmax(logits, t), labels, slides, meta.classes, bootstrap)
    after = bootstrap_metrics(softmax(logits / t + bias), labels, slides, meta.classes, bootstrap)
    report = {"class_bias": bias.tolist(), "sample": source, "n": len(sample), "counts": dict(counts),
              "before": before, "after": after, "ridge": ridge}
    if out is None:
        return None, report
    from core.checkpoint import checkpoint_files, write_meta

    src_w, _ = checkpoint_files(checkpoint)
    dst_w, dst_j = checkpoint_files(out)
    if dst_w.resolve() == src_w.resolve():
        raise DataError("--out must name a new checkpoint; the original is kept as trained")
    dst_w.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src_w, dst_w)
    meta.class_bias = bias.tolist()
    meta.adapted = {"from": str(src_w), "sample": source, "n": len(sample), "counts": dict(counts), "ridge": ridge,
                    "macro_f1_before": before["macro_f1"]["value"], "macro_f1_after": after["macro_f1"]["value"]}
    write_meta(dst_j, meta)
    return dst_w, report
