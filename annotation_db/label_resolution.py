"""Which classes each image of a dataset has, read back from the labels: one annotator's, the
majority of the people who labeled it (models do not vote), the adjudicated label, or ``final``
(adjudicated where decided, else majority). Export, training and the agreement report read labels
through here; :func:`dataset_stats` counts what a person asks for first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from annotation_db.db import StoreError
from annotation_db.models import Adjudication, Annotator, Dataset, Image, Label, Slide
from annotation_db.store import get_dataset


# Annotators named so are models (the viewer's "I disagree" records the model's call this way).
MODEL_ANNOTATOR_PREFIX = "model:"

# Where a label comes from when exporting or training.
LABEL_SOURCES = ("majority", "adjudicated", "final", "annotator:<name>")


def is_model_annotator(name: str) -> bool:
    """Labels by ``model:<checkpoint>`` record what a model said, not what a person decided."""
    return name.startswith(MODEL_ANNOTATOR_PREFIX)


@dataclass(frozen=True)
class LabeledItem:
    """An image with the classes a label source gives it (what training reads)."""

    image_id: int
    path: str  # absolute
    rel_path: str
    classes: list[str]
    slide: str | None = None
    patient: str | None = None


@dataclass
class ResolvedLabels:
    """Classes per image id for one label source, and the images it could not decide."""

    by_image: dict[int, list[str]] = field(default_factory=dict)
    undecided: list[int] = field(default_factory=list)  # ties under majority vote


def labels_per_annotator(
    session: Session, dataset: Dataset, *, include_models: bool = True
) -> dict[int, dict[str, list[str]]]:
    """image id -> annotator name -> classes, for every current label in ``dataset``."""
    stmt = (
        select(Label.image_id, Annotator.name, Label.classes)
        .join(Image, Image.id == Label.image_id)
        .join(Annotator, Annotator.id == Label.annotator_id)
        .where(Image.dataset_id == dataset.id)
        .order_by(Label.image_id, Annotator.name)
    )
    if not include_models:
        stmt = stmt.where(Annotator.name.not_like(f"{MODEL_ANNOTATOR_PREFIX}%"))
    rows = session.execute(stmt)
    out: dict[int, dict[str, list[str]]] = {}
    for image_id, name, classes in rows:
        if classes:
            out.setdefault(image_id, {})[name] = list(classes)
    return out


def majority_vote(votes: Sequence[list[str]], class_keys: Sequence[str], multi_label: bool) -> list[str] | None:
    """The majority label of several annotators' votes; None on a tie.

    Single-label: the most voted class. Multi-label: each class voted by more than half.
    """
    if not votes:
        return None
    if multi_label:
        counts = Counter(c for v in votes for c in v)
        return [k for k in class_keys if counts[k] * 2 > len(votes)]
    counts = Counter(v[0] for v in votes if v)
    ranked = counts.most_common()
    if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
        return None
    return [ranked[0][0]]


def resolve_labels(session: Session, dataset: Dataset, source: str = "majority") -> ResolvedLabels:
    """Labels of ``dataset`` from ``source``: ``annotator:NAME``, ``majority`` (of people; labels
    by ``model:`` annotators do not vote), ``adjudicated`` or ``final`` (adjudicated where decided,
    else majority)."""
    out = ResolvedLabels()
    if source.startswith("annotator:"):
        name = source.split(":", 1)[1]
        annotator = session.scalar(select(Annotator).where(Annotator.name == name))
        if annotator is None:
            raise StoreError(f"No annotator named {name!r} in the store.")
        rows = session.execute(
            select(Label.image_id, Label.classes)
            .join(Image, Image.id == Label.image_id)
            .where(Image.dataset_id == dataset.id, Label.annotator_id == annotator.id)
        )
        out.by_image = {i: list(c) for i, c in rows if c}
        return out
    if source not in ("majority", "adjudicated", "final"):
        raise StoreError(f"Unknown label source {source!r}; use one of {', '.join(LABEL_SOURCES)}.")
    if source in ("adjudicated", "final"):
        rows = session.execute(
            select(Adjudication.image_id, Adjudication.classes)
            .join(Image, Image.id == Adjudication.image_id)
            .where(Image.dataset_id == dataset.id)
        )
        out.by_image = {i: list(c) for i, c in rows}
        if source == "adjudicated":
            return out
    # A model's call is not a vote: majorities are of people.
    keys, multi = dataset.class_keys, dataset.multi_label  # once, not per image
    for image_id, votes in labels_per_annotator(session, dataset, include_models=False).items():
        if image_id in out.by_image:
            continue
        if len(votes) == 1:  # one person's label is the majority of one
            [only] = votes.values()
            out.by_image[image_id] = [k for k in keys if k in only] if multi else only[:1]
            continue
        decided = majority_vote(list(votes.values()), keys, multi)
        if decided:
            out.by_image[image_id] = decided
        else:
            out.undecided.append(image_id)
    return out


def dataset_images(session: Session, dataset: Dataset) -> list[tuple[Any, str | None]]:
    """All images of ``dataset`` in the order they were registered, with their slide names.

    Each image is a light row with ``id``, ``path`` and ``sha256`` (not an ORM object: exports of
    100,000 images spent most of their time building those).
    """
    rows = session.execute(
        select(Image.id, Image.path, Image.sha256, Slide.name.label("slide_name"))
        .outerjoin(Slide, Slide.id == Image.slide_id)
        .where(Image.dataset_id == dataset.id)
        .order_by(Image.id)
    )
    return [(row, row.slide_name) for row in rows]


def labeled_items(session: Session, dataset_name: str, source: str = "majority") -> list[LabeledItem]:
    """Images of a dataset with their classes from ``source``, for training and evaluation."""
    dataset = get_dataset(session, dataset_name)
    resolved = resolve_labels(session, dataset, source).by_image
    root = Path(dataset.root or ".")
    patients = dict(session.execute(select(Slide.name, Slide.patient).where(Slide.patient.is_not(None))).all())
    return [
        LabeledItem(image_id=img.id, path=str(root / img.path), rel_path=img.path, classes=resolved[img.id],
                    slide=slide, patient=patients.get(slide) if slide else None)
        for img, slide in dataset_images(session, dataset)
        if img.id in resolved
    ]


def dataset_stats(session: Session, dataset: Dataset) -> dict:
    """Counts a person asks for first: images, labels per annotator and class, adjudications."""
    n_images = session.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == dataset.id))
    per_annotator = dict(
        session.execute(
            select(Annotator.name, func.count(Label.id))
            .join(Label, Label.annotator_id == Annotator.id)
            .join(Image, Image.id == Label.image_id)
            .where(Image.dataset_id == dataset.id)
            .group_by(Annotator.name)
            .order_by(Annotator.name)
        ).all()
    )
    resolved = resolve_labels(session, dataset, "final")
    per_class = Counter(c for classes in resolved.by_image.values() for c in classes)
    n_adjudicated = session.scalar(
        select(func.count()).select_from(Adjudication).join(Image).where(Image.dataset_id == dataset.id)
    )
    n_slides = session.scalar(
        select(func.count(func.distinct(Image.slide_id))).where(Image.dataset_id == dataset.id)
    )
    return {
        "dataset": dataset.name,
        "images": n_images,
        "slides": n_slides,
        "labels_per_annotator": per_annotator,
        "final_per_class": {k: per_class.get(k, 0) for k in dataset.class_keys},
        "undecided": len(resolved.undecided),
        "adjudicated": n_adjudicated,
    }
