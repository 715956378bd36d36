"""Agreement between annotators: Cohen's kappa (two), Fleiss' kappa (more), per class and overall,
the between-annotator confusion matrix, and the disagreements, worst first.

Kappa is NaN where it is undefined (every rating in one category).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy.orm import Session

from annotation_db.models import Dataset
from annotation_db.store import dataset_images, labels_per_annotator


def cohen_kappa(a: Sequence, b: Sequence) -> float:
    """Cohen's kappa of two equally long rating sequences (any hashable categories)."""
    if len(a) != len(b):
        raise ValueError(f"rating sequences differ in length: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        return math.nan
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return math.nan if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa from an items × categories matrix of rating counts.

    Items may have different numbers of raters (each at least two); this is the usual
    generalisation, and equals Fleiss (1971) when every item has the same number.
    """
    counts = np.asarray(counts, dtype=float)
    n_i = counts.sum(axis=1)
    keep = n_i >= 2
    counts, n_i = counts[keep], n_i[keep]
    if len(counts) == 0:
        return math.nan
    p_i = ((counts * counts).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_bar = p_i.mean()
    p_j = counts.sum(axis=0) / n_i.sum()
    p_e = float((p_j * p_j).sum())
    return math.nan if p_e == 1 else float((p_bar - p_e) / (1 - p_e))


@dataclass
class Disagreement:
    image_id: int
    path: str
    votes: dict[str, list[str]]  # annotator -> classes
    agreement: float  # share of annotators agreeing with the most common label


@dataclass
class AgreementReport:
    dataset: str
    annotators: list[str]
    classes: list[str]
    method: str  # "cohen" or "fleiss"
    items: int  # images labeled by at least two annotators
    kappa: float  # overall (single-label: all classes at once; multi-label: mean of per-class)
    per_class_kappa: dict[str, float]
    # Rows: first annotator's class, columns: second's; summed over annotator pairs when more.
    confusion: list[list[int]]
    disagreements: list[Disagreement] = field(default_factory=list)

    def to_dict(self) -> dict:
        def clean(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 6)

        return {
            "dataset": self.dataset,
            "annotators": self.annotators,
            "classes": self.classes,
            "method": self.method,
            "items": self.items,
            "kappa": clean(self.kappa),
            "per_class_kappa": {k: clean(v) for k, v in self.per_class_kappa.items()},
            "confusion": self.confusion,
            "disagreements": [d.__dict__ for d in self.disagreements],
        }


def _label_key(classes: list[str]) -> str:
    return "+".join(classes)


def agreement_report(
    session: Session, dataset: Dataset, annotators: Sequence[str] | None = None
) -> AgreementReport:
    """Agreement of ``annotators`` (default: every person who labeled; name ``model:...``
    annotators explicitly to compare a model with people) on ``dataset``."""
    votes_by_image = labels_per_annotator(session, dataset, include_models=annotators is not None)
    names = sorted({a for v in votes_by_image.values() for a in v}) if annotators is None else list(annotators)
    keys = dataset.class_keys
    shared = {
        i: {a: v[a] for a in names if a in v} for i, v in votes_by_image.items() if sum(a in v for a in names) >= 2
    }
    index = {k: j for j, k in enumerate(keys)}
    confusion = np.zeros((len(keys), len(keys)), dtype=int)
    method = "cohen" if len(names) == 2 else "fleiss"

    per_class: dict[str, float] = {}
    if method == "cohen" and shared:
        a, b = names
        pairs = [(v[a], v[b]) for v in shared.values() if a in v and b in v]
        for k in keys:
            per_class[k] = cohen_kappa([k in x for x, _ in pairs], [k in y for _, y in pairs])
        overall = (
            cohen_kappa([_label_key(x) for x, _ in pairs], [_label_key(y) for _, y in pairs])
            if not dataset.multi_label
            else float(np.nanmean(list(per_class.values()))) if pairs else math.nan
        )
    else:
        items = list(shared.values())
        for k in keys:
            counts = np.array([[sum(k in c for c in v.values()), sum(k not in c for c in v.values())] for v in items])
            per_class[k] = fleiss_kappa(counts) if items else math.nan
        if dataset.multi_label or not items:
            valid = [x for x in per_class.values() if not math.isnan(x)]
            overall = float(np.mean(valid)) if valid else math.nan
        else:
            counts = np.zeros((len(items), len(keys)))
            for r, v in enumerate(items):
                for c in v.values():
                    counts[r, index[c[0]]] += 1
            overall = fleiss_kappa(counts)

    # Confusion: every ordered pair (earlier annotator by name, later) on shared images.
    for v in shared.values():
        present = [a for a in names if a in v]
        for i, a in enumerate(present):
            for b in present[i + 1 :]:
                for ka in v[a]:
                    for kb in v[b]:
                        confusion[index[ka], index[kb]] += 1

    paths = {img.id: img.path for img, _ in dataset_images(session, dataset)}
    disagreements = []
    for image_id, v in shared.items():
        tally = Counter(_label_key(c) for c in v.values())
        top = tally.most_common(1)[0][1]
        if top < len(v):
            disagreements.append(Disagreement(image_id, paths.get(image_id, "?"), v, round(top / len(v), 4)))
    disagreements.sort(key=lambda d: (d.agreement, -len(d.votes), d.image_id))
    return AgreementReport(
        dataset=dataset.name,
        annotators=names,
        classes=keys,
        method=method,
        items=len(shared),
        kappa=overall,
        per_class_kappa=per_class,
        confusion=confusion.tolist(),
        disagreements=disagreements,
    )
