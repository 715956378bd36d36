"""What the diagnosis viewer writes to the annotation store: crops, predictions, disagreements.

- Uploaded crops are kept content-addressed (``<sha256>.<ext>``) under the root of a
  ``viewer-uploads`` dataset that has the checkpoint's class schema, and registered there.
- Every prediction the viewer shows for a crop in the store becomes a ``Prediction`` row, so the
  labeling app can order its queue by model uncertainty.
- "I disagree" writes the clinician's label (attributed) and, unless another person's label
  already disagrees with it, the model's prediction as a label by ``model:<checkpoint id>``. Two
  distinct labels put the crop in the labeling app's disagreement queue
  (:mod:`annotation_db.queues`); with only the model and the clinician, the majority vote is a
  tie, so the crop waits for adjudication instead of being decided by the model.

Functions take a session; the caller owns the transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from annotation_db.models import Annotator, Dataset, Image, Label, Slide
from annotation_db.store import (
    GLOMERULUS_CLASSES,
    MODEL_ANNOTATOR_PREFIX,
    ClassSpec,
    DatasetNotFoundError,
    InvalidLabelError,
    add_image,
    add_prediction,
    create_dataset,
    get_dataset,
    image_abspath,
    set_label,
)
from core.uploads import CheckedImage

__all__ = ["UPLOADS_DATASET", "DisagreementResult", "StoredCrop", "uploads_dataset_name", "ensure_uploads_dataset",
           "store_upload", "record_predictions", "record_disagreement", "dataset_crops", "dataset_slides", "model_annotator"]

UPLOADS_DATASET = "viewer-uploads"
MODEL_PREFIX = MODEL_ANNOTATOR_PREFIX


@dataclass(frozen=True)
class StoredCrop:
    """A crop in the store, as the viewer lists it."""

    image_id: int
    path: Path  # absolute
    slide: str | None
    dataset: str


@dataclass(frozen=True)
class DisagreementResult:
    image_id: int
    dataset: str
    clinician: str
    chosen: str
    model_label: str | None  # the class written for the model, None when not needed
    in_queue: bool


def model_annotator(checkpoint_id: str) -> str:
    return f"{MODEL_PREFIX}{checkpoint_id}"


def uploads_dataset_name(classes: Sequence[str]) -> str:
    """``viewer-uploads`` for the glomerulus schema; other schemas get their own dataset."""
    if list(classes) == [c.key for c in GLOMERULUS_CLASSES]:
        return UPLOADS_DATASET
    tag = hashlib.sha256("\n".join(classes).encode()).hexdigest()[:8]
    return f"{UPLOADS_DATASET}-{tag}"


def ensure_uploads_dataset(session: Session, classes: Sequence[str], display_names: dict[str, str],
                           data_root: str | Path) -> Dataset:
    """The uploads dataset for this class schema (created on first use, root under ``data_root``)."""
    name = uploads_dataset_name(classes)
    try:
        dataset = get_dataset(session, name)
    except DatasetNotFoundError:
        specs = [ClassSpec(k, display_names.get(k, k)) for k in classes]
        root = Path(data_root) / name
        root.mkdir(parents=True, exist_ok=True)
        return create_dataset(session, name, specs, root=root,
                              description="Crops uploaded to the diagnosis viewer (content-addressed).")
    if dataset.class_keys != list(classes):
        raise InvalidLabelError(f"dataset {name!r} has classes {dataset.class_keys}, the checkpoint {list(classes)}")
    return dataset


def store_upload(session: Session, dataset: Dataset, crop: CheckedImage) -> Image:
    """Write ``crop`` as ``<sha256><ext>`` under the dataset root (once) and register it."""
    rel = f"{crop.sha256}{crop.suffix}"
    path = Path(dataset.root) / rel
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(crop.data)
        tmp.replace(path)
    return add_image(session, dataset, rel)


def record_predictions(session: Session, items: Sequence[tuple[Image, dict[str, float]]], checkpoint_id: str) -> int:
    """One ``Prediction`` row per (image, probabilities); returns how many were written."""
    for image, probs in items:
        add_prediction(session, image, checkpoint_id, probs)
    return len(items)


def record_disagreement(session: Session, image: Image, clinician: str, chosen: str, predicted: str,
                        probs: dict[str, float], checkpoint_id: str, note: str = "") -> DisagreementResult:
    """The clinician's label for ``image`` and, when needed, the model's, so the two disagree."""
    clinician = clinician.strip()
    if not clinician:
        raise InvalidLabelError("say who you are (name or login) before recording a disagreement")
    if clinician.startswith(MODEL_PREFIX):
        raise InvalidLabelError(f"annotator names starting with {MODEL_PREFIX!r} are reserved for models")
    if chosen == predicted:
        raise InvalidLabelError(f"the model also predicts {chosen!r}: there is nothing to disagree with")
    add_prediction(session, image, checkpoint_id, probs)
    p = probs.get(predicted, 0.0)
    set_label(session, image, clinician, [chosen], note=note or f"disagrees with {checkpoint_id} ({predicted}, p={p:.2f})",
              source="viewer:disagree")
    others = session.execute(
        select(Annotator.name, Label.classes)
        .join(Label, Label.annotator_id == Annotator.id)
        .where(Label.image_id == image.id, Annotator.name != clinician)
    ).all()
    human_disagrees = any(not name.startswith(MODEL_PREFIX) and classes and list(classes) != [chosen]
                          for name, classes in others)
    model_label = None
    if not human_disagrees:
        set_label(session, image, model_annotator(checkpoint_id), [predicted], note=f"p={p:.3f}",
                  source="viewer:model")
        model_label = predicted
    return DisagreementResult(image.id, image.dataset.name, clinician, chosen, model_label, in_queue=True)


def dataset_crops(session: Session, dataset_name: str, slide: str | None = None, limit: int = 500) -> list[StoredCrop]:
    """Crops of a dataset (optionally one slide), in registration order, at most ``limit``."""
    dataset = get_dataset(session, dataset_name)
    stmt = (select(Image, Slide.name).outerjoin(Slide, Slide.id == Image.slide_id)
            .where(Image.dataset_id == dataset.id).order_by(Image.id).limit(limit))
    if slide:
        stmt = stmt.where(Slide.name == slide)
    return [StoredCrop(img.id, image_abspath(dataset, img), s, dataset.name) for img, s in session.execute(stmt)]


def dataset_slides(session: Session, dataset_name: str) -> list[str]:
    """Names of the slides a dataset's crops come from."""
    dataset = get_dataset(session, dataset_name)
    rows = session.scalars(select(Slide.name).join(Image, Image.slide_id == Slide.id)
                           .where(Image.dataset_id == dataset.id).distinct().order_by(Slide.name))
    return list(rows)
