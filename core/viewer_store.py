"""What the diagnosis viewer writes to the annotation store: crops, predictions, disagreements.

- Slides with their annotations are cut into a ``viewer-slides`` dataset of the checkpoint's
  schema (:func:`core.slide_crops.crop_into_dataset`, each crop registered with its slide and
  level-0 box). The annotations' classes are shown beside the predictions, never stored as
  labels (importing labels is ``glom extract``'s job).
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

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from annotation_db.classes import GLOMERULUS_CLASSES, ClassSpec, InvalidLabelError
from annotation_db.db import StoreError
from annotation_db.images import image_abspath
from annotation_db.label_resolution import MODEL_ANNOTATOR_PREFIX, is_model_annotator
from annotation_db.models import Annotator, Dataset, Image, Label, Slide
from annotation_db.store import add_image, add_prediction, get_dataset, get_or_create_dataset, set_label
from core.annotations import Annotation
from core.extract import CropSettings, ExtractError
from core.slide_crops import SLIDE_CROP_SETTINGS, SlideCrops, crop_into_dataset
from core.uploads import CheckedImage

__all__ = [
    "SLIDES_DATASET",
    "UPLOADS_DATASET",
    "crop_slide_for_viewer",
    "DisagreementResult",
    "StoredCrop",
    "dataset_crops",
    "dataset_slides",
    "ensure_uploads_dataset",
    "image_for_crop",
    "model_annotator",
    "record_disagreement",
    "record_predictions",
    "store_upload",
    "uploads_dataset_name",
]

UPLOADS_DATASET = "viewer-uploads"
SLIDES_DATASET = "viewer-slides"


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
    return f"{MODEL_ANNOTATOR_PREFIX}{checkpoint_id}"


def uploads_dataset_name(classes: Sequence[str], base: str = UPLOADS_DATASET) -> str:
    """``viewer-uploads`` (or ``base``) for the glomerulus schema; other schemas get their own dataset."""
    if list(classes) == [c.key for c in GLOMERULUS_CLASSES]:
        return base
    tag = hashlib.sha256("\n".join(classes).encode()).hexdigest()[:8]
    return f"{base}-{tag}"


_DATASET_DESCRIPTIONS = {
    UPLOADS_DATASET: "Crops uploaded to the diagnosis viewer (content-addressed).",
    SLIDES_DATASET: "Glomeruli cut from whole slides by the diagnosis viewer (slide + level-0 box).",
}


def ensure_uploads_dataset(session: Session, classes: Sequence[str], display_names: dict[str, str],
                           data_root: str | Path, base: str = UPLOADS_DATASET) -> Dataset:
    """The viewer's dataset ``base`` for this class schema (created on first use, root under ``data_root``)."""
    name = uploads_dataset_name(classes, base)
    specs = [ClassSpec(k, display_names.get(k, k)) for k in classes]
    dataset = get_or_create_dataset(session, name, specs, root=(Path(data_root) / name).resolve(),
                                    description=_DATASET_DESCRIPTIONS.get(base, ""), same_classes=True)
    Path(dataset.root).mkdir(parents=True, exist_ok=True)
    return dataset


def store_upload(session: Session, dataset: Dataset, crop: CheckedImage, max_uploads: int | None = None) -> Image | None:
    """Write ``crop`` as ``<sha256><ext>`` under the dataset root (once) and register it.

    Uploads are kept by content, so the same crop is stored once. ``max_uploads`` bounds how
    many distinct crops the dataset keeps: past it a new crop is not stored (None is returned);
    one already stored is still found.
    """
    rel = f"{crop.sha256}{crop.suffix}"
    existing = session.scalar(select(Image).where(Image.dataset_id == dataset.id, Image.path == rel))
    if existing is not None:
        return existing
    if max_uploads is not None:
        kept = session.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == dataset.id))
        if kept >= max_uploads:
            return None
    path = Path(dataset.root) / rel
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(crop.data)
        tmp.replace(path)
    return add_image(session, dataset, rel)


def image_for_crop(session: Session, crop: CheckedImage, image_id: int | None, classes: Sequence[str],
                   display_names: dict[str, str], data_root: str | Path, max_uploads: int | None = None) -> Image | None:
    """The store row a crop shown in the viewer stands for: the store image ``image_id``, checked
    to hold the same bytes and a class schema with the checkpoint's ``classes``; without an id,
    the upload kept in the viewer's uploads dataset (None past ``max_uploads``, see
    :func:`store_upload`). Raises :class:`StoreError` naming what changed."""
    if image_id is None:
        dataset = ensure_uploads_dataset(session, classes, display_names, data_root)
        return store_upload(session, dataset, crop, max_uploads)
    image = session.get(Image, image_id)
    if image is None:
        raise StoreError(f"crop store:{image_id} is no longer in the store")
    if image.sha256 != crop.sha256:
        raise StoreError("the crop shown is not the store crop it was picked as; pick it again")
    missing = set(classes) - set(image.dataset.class_keys)
    if missing:
        raise StoreError(f"dataset {image.dataset.name!r} has no classes {sorted(missing)} of this checkpoint")
    return image


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
    if is_model_annotator(clinician):
        raise InvalidLabelError(f"annotator names starting with {MODEL_ANNOTATOR_PREFIX!r} are reserved for models")
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
    human_disagrees = any(not is_model_annotator(name) and classes and list(classes) != [chosen]
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


# --- whole slides ----------------------------------------------------------------------------


def crop_slide_for_viewer(session: Session, slide_path: str | Path, annotations: Sequence[Annotation],
                          classes: Sequence[str], display_names: dict[str, str], data_root: str | Path, *,
                          settings: CropSettings = SLIDE_CROP_SETTINGS, mpp: float | None = None) -> SlideCrops:
    """Cut one crop per annotation of ``slide_path`` into the ``viewer-slides`` dataset of this
    class schema (:func:`core.slide_crops.crop_into_dataset`; idempotent). An annotation's class
    that names a checkpoint class (key or display name, any case) is each crop's ``label``,
    shown beside the prediction and never stored; other classes are counted in
    ``ignored_labels``. ``mpp``: µm/px for a slide that records none.

    Raises :class:`core.wsi.SlideError` when the slide cannot be read (no crop stays, nothing is
    registered) and :class:`core.extract.ExtractError` when no annotation can be cropped.
    """
    dataset = ensure_uploads_dataset(session, classes, display_names, data_root, base=SLIDES_DATASET)
    cut = crop_into_dataset(session, dataset, slide_path, annotations, annotator=None, settings=settings, mpp=mpp,
                            source="viewer:slide", unknown_classes="ignore")
    if not cut.crops:
        reasons = "; ".join(str(p) for p in cut.report.refused[:3])
        raise ExtractError(f"none of the {len(annotations)} annotations of {Path(slide_path).name} could be cropped"
                           + (f": {reasons}" if reasons else ""))
    return cut
