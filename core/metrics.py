"""Classification metrics, calibration, plots and the ``report.json`` / ``report.md`` pair.

Everything takes plain arrays: probabilities (N, C), integer labels (N,), class names.
Plots are written with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["classification_metrics", "expected_calibration_error", "fit_temperature",
           "plot_confusion_matrix", "plot_roc", "plot_reliability", "plot_tsne", "plot_history",
           "write_report", "softmax"]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """ECE over equal-width confidence bins, with the per-bin table for the reliability diagram."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    bins = []
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if m.any():
            acc, c = correct[m].mean(), conf[m].mean()
            ece += m.mean() * abs(acc - c)
            bins.append({"lo": float(lo), "hi": float(hi), "count": int(m.sum()),
                         "accuracy": float(acc), "confidence": float(c)})
    return {"ece": float(ece), "bins": bins, "n_bins": n_bins}


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200, prior: float = 10.0) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    ``prior`` adds ``prior / n · (log T)²``: a weak pull towards T = 1 worth about ``prior`` crops, so
    that a validation part of a few dozen crops, nearly all right, cannot sharpen the model
    (T ≪ 1) on noise. That sharpening is what made calibration worse on a new site (issue 12).
    With hundreds of crops the data decide; ``prior=0`` is the plain fit.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y) + prior / len(y) * log_t ** 2
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if np.isfinite(t) and 1e-2 < t < 1e2 else 1.0


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class and macro P/R/F1, confusion matrix, ROC AUC, ECE, NLL."""
    from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support,
                                 roc_auc_score, roc_curve)

    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    k = len(classes)
    pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=int)
    idx = list(range(k))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=idx, zero_division=0)
    per_class: dict[str, Any] = {}
    roc: dict[str, Any] = {}
    for i, name in enumerate(classes):
        entry = {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        pos = labels == i
        if 0 < pos.sum() < len(labels):
            entry["auc"] = float(roc_auc_score(pos, probs[:, i]))
            fpr, tpr, _ = roc_curve(pos, probs[:, i])
            roc[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        else:
            entry["auc"] = None
        per_class[name] = entry
    aucs = [e["auc"] for e in per_class.values() if e["auc"] is not None]
    present = s > 0
    nll = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean()) if len(labels) else None
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()) if len(labels) else None,
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)) if len(labels) else None,
        "macro_precision": float(p[present].mean()) if present.any() else None,
        "macro_recall": float(r[present].mean()) if present.any() else None,
        "macro_f1": float(f[present].mean()) if present.any() else None,
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "nll": nll,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, pred, labels=idx).tolist(),
        "calibration": expected_calibration_error(probs, labels) if len(labels) else None,
        "roc": roc,
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:  # noqa: ANN001 - a matplotlib Figure
    """Lay out, write at 120 dpi and close ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return Path(path)


def plot_confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Counts with row-normalised shading (rows: true class)."""
    plt = _plt()
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_roc(metrics: dict[str, Any], path: str | Path) -> Path:
    """One ROC curve per class (one-vs-rest), AUC in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, curve in metrics["roc"].items():
        auc = metrics["per_class"][name]["auc"]
        ax.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC per class")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(calibrations: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, one line per calibration."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    for name, cal in calibrations.items():
        b = cal["bins"]
        ax.plot([x["confidence"] for x in b], [x["accuracy"] for x in b], "o-",
                label=f"{name} (ECE {cal['ece']:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def tsne_embed(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of feature rows (perplexity adapted to small sets)."""
    from sklearn.manifold import TSNE

    n = len(features)
    perplexity = float(min(30, max(2, (n - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(features, dtype=np.float32))


def plot_tsne(panels: dict[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str],
              path: str | Path, seed: int = 0) -> Path:
    """Side-by-side t-SNE maps: ``{title: (features, labels)}`` (e.g. before/after stain normalisation)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, (title, (feats, labels)) in zip(axes[0], panels.items()):
        if len(feats) < 5:
            ax.set_title(f"{title}: too few images")
            continue
        xy = tsne_embed(feats, seed)
        for i, name in enumerate(classes):
            m = labels == i
            ax.scatter(xy[m, 0], xy[m, 1], s=8, label=name)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_history(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Loss and accuracy/macro-F1 per epoch, train and validation."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        if any(key in h for h in history):
            a.plot(ep, [h.get(key, np.nan) for h in history], label=key)
    for key in ("train_accuracy", "val_accuracy", "val_macro_f1"):
        if any(key in h for h in history):
            b.plot(ep, [h.get(key, np.nan) for h in history], label=key)
    a.set_xlabel("epoch")
    b.set_xlabel("epoch")
    a.legend()
    b.legend()
    return _save(fig, path)


def _fmt(x: Any) -> str:
    return "–" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def write_report(out_dir: str | Path, report: dict[str, Any], classes: Sequence[str]) -> tuple[Path, Path]:
    """Write ``report.json`` (everything) and ``report.md`` (the tables a reader wants)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    lines = [f"# Evaluation: {report.get('name', '')}", ""]
    for key in ("architecture", "checkpoint", "data", "split_groups", "temperature", "code_revision"):
        if report.get(key) is not None:
            lines.append(f"- {key}: {report[key]}")
    lines.append("")
    for part, m in report.get("splits", {}).items():
        if not m or not m.get("n"):
            continue
        lines += [f"## {part} ({m['n']} images)", "",
                  "| accuracy | balanced acc. | macro P | macro R | macro F1 | macro AUC | ECE | ECE (T) |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {_fmt(m['accuracy'])} | {_fmt(m['balanced_accuracy'])} | {_fmt(m['macro_precision'])} "
                  f"| {_fmt(m['macro_recall'])} | {_fmt(m['macro_f1'])} | {_fmt(m['macro_auc'])} "
                  f"| {_fmt((m.get('calibration') or {}).get('ece'))} "
                  f"| {_fmt((m.get('calibration_temperature') or {}).get('ece'))} |", ""]
        if m.get("intervals"):
            from core.intervals import format_ci

            ci = m["intervals"]
            r = ci.get("_resampled", {})
            lines += [f"95 % intervals, bootstrap over {r.get('groups')} {r.get('unit')}s ({r.get('n')} resamples), "
                      f"calibrated predictions: macro-F1 {format_ci(ci['macro_f1'])}, balanced accuracy "
                      f"{format_ci(ci['balanced_accuracy'])}, macro AUC {format_ci(ci['macro_auc'])}, "
                      f"ECE {format_ci(ci['ece'])}.", ""]
        lines += ["| class | precision | recall | F1 | AUC | support |", "|---|---|---|---|---|---|"]
        for name in classes:
            c = m["per_class"][name]
            lines.append(f"| {name} | {_fmt(c['precision'])} | {_fmt(c['recall'])} | {_fmt(c['f1'])} "
                         f"| {_fmt(c['auc'])} | {c['support']} |")
        lines += ["", "Confusion matrix (rows true, columns predicted):", "",
                  "| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
        for name, row in zip(classes, m["confusion_matrix"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
        lines.append("")
    for title, fname in report.get("plots", {}).items():
        lines.append(f"![{title}]({fname})")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out_dir / "report.json", out_dir / "report.md"
