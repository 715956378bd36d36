"""95 % confidence intervals for classification figures, by bootstrap over slides.

Crops of one slide are correlated (same patient, stain, scanner, cutting day), so resampling crops
pretends to far more evidence than there is. :func:`bootstrap_metrics` resamples whole groups
(slides; crops only where no slide is known) with replacement and reports the 2.5 and 97.5
percentiles of each figure next to its value on the data as it is.

    figs = bootstrap_metrics(probs, labels, slides, classes, n=1000, seed=0)
    figs["macro_f1"]   # {"value": 0.953, "lo": 0.921, "hi": 0.978}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from core.metrics import expected_calibration_error

__all__ = ["point_metrics", "bootstrap_metrics", "format_ci", "HEADLINE"]

# The figures every report leads with, in order.
HEADLINE = ("macro_f1", "balanced_accuracy", "macro_auc", "ece")


def _auc(pos: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve by the rank-sum identity (ties counted half); None if one class."""
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def point_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, float | None]:
    """Macro-F1, balanced accuracy, per-class recall (``recall/<class>``), macro AUC, ECE, accuracy.

    Classes absent from ``labels`` are left out of the macro figures (as in
    :func:`core.metrics.classification_metrics`), so a resample without a class stays defined.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    pred = probs.argmax(1)
    out: dict[str, float | None] = {"accuracy": float((pred == labels).mean()) if len(labels) else None}
    f1s, recalls, aucs = [], [], []
    for i, name in enumerate(classes):
        pos = labels == i
        tp = int((pos & (pred == i)).sum())
        n_true, n_pred = int(pos.sum()), int((pred == i).sum())
        recall = tp / n_true if n_true else None
        out[f"recall/{name}"] = recall
        if n_true:
            recalls.append(recall)
            f1s.append(2 * tp / (n_true + n_pred))
            auc = _auc(pos, probs[:, i])
            if auc is not None:
                aucs.append(auc)
    out["macro_f1"] = float(np.mean(f1s)) if f1s else None
    out["balanced_accuracy"] = float(np.mean(recalls)) if recalls else None
    # Two classes: both one-vs-rest AUCs are the same number; the mean is that number.
    out["macro_auc"] = float(np.mean(aucs)) if aucs else None
    out["ece"] = expected_calibration_error(probs, labels)["ece"] if len(labels) else None
    return out


def bootstrap_metrics(probs: np.ndarray, labels: np.ndarray, groups: Sequence[str | None] | None,
                      classes: Sequence[str], n: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Each figure of :func:`point_metrics` with a percentile interval from ``n`` group resamples.

    ``groups`` names each crop's slide; crops with no slide (None) are their own group. Resamples
    missing a class the data has are redrawn (the interval is conditional on every class being
    seen). Returns
    ``{figure: {"value", "lo", "hi"}}`` plus ``"_resampled": {"unit", "groups", "n"}``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    value = point_metrics(probs, labels, classes)
    if groups is None:
        groups = [None] * len(labels)
    keys = [g if g is not None else f"__crop_{i}" for i, g in enumerate(groups)]
    unit = "slide" if any(g is not None for g in groups) else "crop"
    index: dict[str, list[int]] = {}
    for i, g in enumerate(keys):
        index.setdefault(g, []).append(i)
    members = [np.asarray(v) for v in index.values()]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in value}
    present = set(labels.tolist())
    kept = tries = 0
    if len(members) > 1 and n > 0:
        # A resample that loses a class would score macro figures on the other classes alone
        # (a perfect 1.0 when one class is left): such draws are redrawn, as in a stratified bootstrap.
        while kept < n and tries < 20 * n:
            tries += 1
            pick = rng.integers(0, len(members), len(members))
            idx = np.concatenate([members[j] for j in pick])
            if set(labels[idx].tolist()) != present:
                continue
            kept += 1
            for k, v in point_metrics(probs[idx], labels[idx], classes).items():
                if v is not None:
                    draws[k].append(v)
    a = (1 - level) / 2
    out: dict[str, dict[str, Any]] = {}
    for k, v in value.items():
        d = draws[k]
        lo, hi = (float(np.quantile(d, a)), float(np.quantile(d, 1 - a))) if len(d) >= 20 else (None, None)
        out[k] = {"value": v, "lo": lo, "hi": hi}
    out["_resampled"] = {"unit": unit, "groups": len(members), "n": kept, "redrawn": tries - kept}
    return out


def format_ci(fig: dict[str, Any] | None, digits: int = 3) -> str:
    """``0.953 [0.921–0.978]``; ``–`` when undefined."""
    if not fig or fig.get("value") is None:
        return "–"
    v = f"{fig['value']:.{digits}f}"
    if fig.get("lo") is None:
        return v
    return f"{v} [{fig['lo']:.{digits}f}–{fig['hi']:.{digits}f}]"
