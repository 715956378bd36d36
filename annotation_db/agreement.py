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

from annotation_db.label_resolution import dataset_images, labels_per_annotator
from annotation_db.models import Dataset


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


# --- suggestions and automation bias ------------------------------------------------------------


@dataclass
class SliceFigures:
    """Agreement on one slice of the images (``blind``: never shown a suggestion; ``rest``)."""

    labels: int = 0  # people's single-class labels
    with_model: int = 0  # ... of images the reference model predicted
    agree_model: int = 0  # ... that equal its class
    items: int = 0  # images with at least two people's labels
    pairs: int = 0  # annotator pairs on those images
    agree_pairs: int = 0
    kappa: float = math.nan  # Fleiss' kappa of people on those images

    @property
    def model_agreement(self) -> float:
        return self.agree_model / self.with_model if self.with_model else math.nan

    @property
    def pair_agreement(self) -> float:
        return self.agree_pairs / self.pairs if self.pairs else math.nan


@dataclass
class BiasFigures:
    """On adjudicated images where the model was wrong: followed when shown vs chosen unprompted."""

    shown_wrong: int = 0  # labels given while a wrong suggestion was on screen
    followed_wrong: int = 0  # ... that took the wrong class
    blind_wrong: int = 0  # labels on blind images the model gets wrong (no suggestion shown)
    chose_unprompted: int = 0  # ... that chose the model's wrong class anyway

    @property
    def followed_rate(self) -> float:
        return self.followed_wrong / self.shown_wrong if self.shown_wrong else math.nan

    @property
    def unprompted_rate(self) -> float:
        return self.chose_unprompted / self.blind_wrong if self.blind_wrong else math.nan


@dataclass
class SuggestionReport:
    dataset: str
    checkpoint_id: str | None  # the model agreement is measured against
    blind_share: float
    slices: dict[str, SliceFigures]  # "blind", "rest"
    per_annotator: dict[str, dict[str, SliceFigures]]  # annotator -> slice -> figures (labels, model)
    bias: dict[str, BiasFigures]  # annotator -> figures; "all" for everyone

    def to_dict(self) -> dict:
        def clean(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 6)

        def sl(f: SliceFigures) -> dict:
            return {**f.__dict__, "kappa": clean(f.kappa), "model_agreement": clean(f.model_agreement),
                    "pair_agreement": clean(f.pair_agreement)}

        return {
            "dataset": self.dataset, "checkpoint_id": self.checkpoint_id, "blind_share": self.blind_share,
            "slices": {k: sl(v) for k, v in self.slices.items()},
            "per_annotator": {a: {k: sl(v) for k, v in s.items()} for a, s in self.per_annotator.items()},
            "bias": {a: {**b.__dict__, "followed_rate": clean(b.followed_rate),
                         "unprompted_rate": clean(b.unprompted_rate)} for a, b in self.bias.items()},
        }


def suggestion_report(session: Session, dataset: Dataset, checkpoint_id: str | None = None) -> SuggestionReport:
    """People's labels on the blind slice vs the rest: agreement with the model (``checkpoint_id``,
    default the dataset's suggestion model), between clinicians, and, on adjudicated images the
    model gets wrong, how often each clinician took the wrong class when it was suggested vs
    chose it with no suggestion (blind slice). Single-class labels only; multi-label and
    uncertain-only labels are left out."""
    from sqlalchemy import select

    from annotation_db.label_resolution import MODEL_ANNOTATOR_PREFIX
    from annotation_db.models import Adjudication, Annotator, Image, Label, Prediction
    from annotation_db.suggestions import is_blind, suggestion_checkpoint

    ckpt = checkpoint_id or suggestion_checkpoint(session, dataset)
    model: dict[int, str] = {}
    if ckpt:
        rows = session.execute(
            select(Prediction.image_id, Prediction.predicted)
            .join(Image, Image.id == Prediction.image_id)
            .where(Image.dataset_id == dataset.id, Prediction.checkpoint_id == ckpt)
            .order_by(Prediction.id)
        )
        model = dict(rows.all())  # the latest prediction per image wins
    final = dict(session.execute(
        select(Adjudication.image_id, Adjudication.classes)
        .join(Image, Image.id == Adjudication.image_id)
        .where(Image.dataset_id == dataset.id)
    ).all())
    labels = session.execute(
        select(Label.image_id, Annotator.name, Label.classes, Label.suggested)
        .join(Annotator, Annotator.id == Label.annotator_id)
        .join(Image, Image.id == Label.image_id)
        .where(Image.dataset_id == dataset.id, Annotator.name.not_like(f"{MODEL_ANNOTATOR_PREFIX}%"))
        .order_by(Label.image_id, Annotator.name)
    ).all()

    slices = {"blind": SliceFigures(), "rest": SliceFigures()}
    per_annotator: dict[str, dict[str, SliceFigures]] = {}
    bias: dict[str, BiasFigures] = {"all": BiasFigures()}
    by_image: dict[int, list[str]] = {}
    blind_of: dict[int, bool] = {}
    for image_id, name, classes, suggested in labels:
        if len(classes or []) != 1:
            continue
        chosen = classes[0]
        blind = blind_of.setdefault(image_id, is_blind(image_id, dataset.blind_seed, dataset.blind_share))
        which = "blind" if blind else "rest"
        by_image.setdefault(image_id, []).append(chosen)
        mine = per_annotator.setdefault(name, {"blind": SliceFigures(), "rest": SliceFigures()})[which]
        for f in (slices[which], mine):
            f.labels += 1
            if image_id in model:
                f.with_model += 1
                f.agree_model += chosen == model[image_id]
        truth = final.get(image_id)
        if not truth:
            continue
        b = bias.setdefault(name, BiasFigures())
        for f in (b, bias["all"]):
            if suggested is not None and suggested not in truth:
                f.shown_wrong += 1
                f.followed_wrong += chosen == suggested
            elif blind and image_id in model and model[image_id] not in truth:
                f.blind_wrong += 1
                f.chose_unprompted += chosen == model[image_id]

    keys = dataset.class_keys
    index = {k: j for j, k in enumerate(keys)}
    for which, f in slices.items():
        items = [v for i, v in by_image.items() if len(v) >= 2 and blind_of[i] == (which == "blind")]
        f.items = len(items)
        counts = np.zeros((len(items), len(keys)))
        for r, v in enumerate(items):
            for c in v:
                counts[r, index[c]] += 1
            for x in range(len(v)):
                for y in range(x + 1, len(v)):
                    f.pairs += 1
                    f.agree_pairs += v[x] == v[y]
        f.kappa = fleiss_kappa(counts) if items else math.nan
    return SuggestionReport(dataset.name, ckpt, float(dataset.blind_share), slices, per_annotator, bias)


def suggestion_report_lines(report: SuggestionReport) -> list[str]:
    """The report as text (``glom agreement``)."""
    def pct(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{100 * x:.1f} %"

    lines = [(f"suggestions: model {report.checkpoint_id or '(none)'}; blind slice {pct(report.blind_share)} of "
              "images (never shown a suggestion) vs the rest")]
    for which, f in report.slices.items():
        lines.append(f"  {which:5s}: {f.labels} labels, agree with the model {pct(f.model_agreement)} "
                     f"({f.with_model} predicted); between clinicians {pct(f.pair_agreement)} of {f.pairs} pairs "
                     f"on {f.items} images, kappa {'n/a' if math.isnan(f.kappa) else f'{f.kappa:.3f}'}")
    for name, s in sorted(report.per_annotator.items()):
        lines.append(f"  {name}: agree with the model, blind {pct(s['blind'].model_agreement)} "
                     f"({s['blind'].with_model}) vs rest {pct(s['rest'].model_agreement)} ({s['rest'].with_model})")
    lines.append("automation bias (adjudicated images the model gets wrong): followed a wrong suggestion vs "
                 "chose that class unprompted (blind slice)")
    for name, b in sorted(report.bias.items(), key=lambda kv: (kv[0] != "all", kv[0])):
        lines.append(f"  {name}: followed {b.followed_wrong}/{b.shown_wrong} ({pct(b.followed_rate)}) vs "
                     f"unprompted {b.chose_unprompted}/{b.blind_wrong} ({pct(b.unprompted_rate)})")
    return lines
