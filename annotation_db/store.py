"""Writes and queries of the annotation store: datasets, annotators, slides, images, labels with
their history, adjudications and model predictions. Every function takes a session; the caller
owns the transaction (``with Session() as s, s.begin(): ...``), so a batch of calls is
all-or-nothing.

Image files and path checks live in :mod:`annotation_db.images`, class schemas in
:mod:`annotation_db.classes`, reading labels back (majority, adjudicated, final; statistics) in
:mod:`annotation_db.label_resolution`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from annotation_db.classes import ClassSpec, InvalidLabelError, default_hotkey, validate_classes
from annotation_db.db import StoreError
from annotation_db.images import normalize_rel_path, read_image_meta, resolve_in_root
from annotation_db.models import (
    Adjudication,
    Annotator,
    ClassDef,
    Dataset,
    Image,
    Label,
    LabelEvent,
    Prediction,
    Slide,
    Stain,
    utcnow,
)

log = logging.getLogger(__name__)


class DatasetNotFoundError(StoreError):
    pass


class DatasetExistsError(StoreError):
    pass


# --- datasets, annotators, slides -------------------------------------------------------------


def new_dataset(
    name: str,
    classes: Sequence[ClassSpec | str],
    *,
    multi_label: bool = False,
    root: str | Path = "",
    description: str = "",
) -> Dataset:
    """A dataset with an ordered class schema (keys unique and non-empty), in no session yet: what
    :func:`create_dataset` adds, and what a staged import checks its records against before it
    creates the dataset at publish."""
    specs = [c if isinstance(c, ClassSpec) else ClassSpec(c, c) for c in classes]
    if not specs:
        raise InvalidLabelError(f"Dataset {name!r} needs at least one class.")
    keys = [s.key for s in specs]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    if dupes or any(not k.strip() for k in keys):
        raise InvalidLabelError(f"Dataset {name!r}: class keys must be unique and non-empty, got {keys}.")
    dataset = Dataset(
        name=name,
        multi_label=multi_label,
        root=str(Path(root).expanduser().resolve()) if str(root) else "",
        description=description,
    )
    dataset.classes = [
        ClassDef(position=i, key=s.key, display_name=s.display_name, hotkey=s.hotkey or default_hotkey(i))
        for i, s in enumerate(specs)
    ]
    return dataset


def create_dataset(
    session: Session,
    name: str,
    classes: Sequence[ClassSpec | str],
    *,
    multi_label: bool = False,
    root: str | Path = "",
    description: str = "",
) -> Dataset:
    """Create a dataset with an ordered class schema (keys must be unique and non-empty)."""
    if session.scalar(select(Dataset.id).where(Dataset.name == name)) is not None:
        raise DatasetExistsError(f"A dataset named {name!r} already exists.")
    dataset = new_dataset(name, classes, multi_label=multi_label, root=root, description=description)
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, name: str) -> Dataset:
    dataset = session.scalar(
        select(Dataset).where(Dataset.name == name).options(selectinload(Dataset.classes))
    )
    if dataset is None:
        known = session.scalars(select(Dataset.name).order_by(Dataset.name)).all()
        raise DatasetNotFoundError(
            f"No dataset named {name!r} in the store (known: {', '.join(known) or 'none'}); "
            "create one with `glom import ... --dataset NAME` or `glom demo`."
        )
    return dataset


def get_or_create_dataset(
    session: Session,
    name: str,
    classes: Sequence[ClassSpec | str],
    *,
    root: str | Path,
    multi_label: bool = False,
    description: str = "",
    same_classes: bool = False,
) -> Dataset:
    """The dataset ``name``; created with ``classes``, ``root`` and ``description`` when missing.

    ``same_classes``: an existing dataset must have exactly these class keys, in this order (the
    viewer's datasets follow a checkpoint's schema); otherwise its own schema is kept and callers
    check their labels against it. Raises :class:`DatasetNotFoundError` when the dataset is
    missing and no classes are given to create it.
    """
    keys = [c.key if isinstance(c, ClassSpec) else c for c in classes]
    try:
        dataset = get_dataset(session, name)
    except DatasetNotFoundError:
        if not keys:
            raise DatasetNotFoundError(
                f"Dataset {name!r} does not exist and no classes are known to create it; name them (--classes)."
            ) from None
        log.info("creating dataset %r (root %s) with classes %s", name, root, keys)
        return create_dataset(session, name, classes, multi_label=multi_label, root=root, description=description)
    if same_classes and dataset.class_keys != keys:
        raise InvalidLabelError(f"dataset {name!r} has classes {dataset.class_keys}, not {keys}")
    return dataset


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.name).options(selectinload(Dataset.classes))))


def get_or_create_annotator(session: Session, name: str) -> Annotator:
    name = name.strip()
    if not name:
        raise InvalidLabelError("An annotator needs a non-empty name.")
    annotator = session.scalar(select(Annotator).where(Annotator.name == name))
    if annotator is None:
        annotator = Annotator(name=name)
        session.add(annotator)
        session.flush()
    return annotator


def get_or_create_slide(
    session: Session,
    name: str,
    *,
    path: str | None = None,
    stain: Stain | str | None = None,
    mpp: float | None = None,
    patient: str | None = None,
) -> Slide:
    """The slide called ``name``; fields given here fill in what the store does not know yet.

    A ``patient`` other than the one already recorded raises :class:`InvalidLabelError` (a
    slide comes from one patient; :func:`set_slide_patient` changes it on purpose).
    """
    slide = session.scalar(select(Slide).where(Slide.name == name))
    if slide is None:
        slide = Slide(name=name, path=path, stain=Stain(stain) if stain else Stain.OTHER, mpp=mpp,
                      patient=patient or None)
        session.add(slide)
        session.flush()
        return slide
    if patient and slide.patient and slide.patient != patient:
        raise InvalidLabelError(f"slide {name!r} belongs to patient {slide.patient!r} in the store, not {patient!r}")
    if patient and not slide.patient:
        slide.patient = patient
    if path and not slide.path:
        slide.path = path
    if stain and slide.stain == Stain.OTHER:
        slide.stain = Stain(stain)
    if mpp and not slide.mpp:
        slide.mpp = mpp
    return slide


def set_slide_patient(session: Session, name: str, patient: str | None) -> Slide:
    """Record (or clear, with None) the patient of an existing slide."""
    slide = session.scalar(select(Slide).where(Slide.name == name))
    if slide is None:
        raise StoreError(f"no slide {name!r} in the store")
    slide.patient = (patient or "").strip() or None
    return slide


# --- images ------------------------------------------------------------------------------------


def find_image(session: Session, dataset: Dataset, rel_path: str) -> Image | None:
    return session.scalar(select(Image).where(Image.dataset_id == dataset.id, Image.path == rel_path))


def add_image(
    session: Session,
    dataset: Dataset,
    path: str | Path,
    *,
    slide: Slide | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> Image:
    """Register one image file (path relative to the root, or absolute inside it); idempotent."""
    rel = normalize_rel_path(dataset, path)
    existing = find_image(session, dataset, rel)
    if existing is not None:
        return existing
    meta = read_image_meta(resolve_in_root(dataset, rel))
    x0, y0, bw, bh = box if box else (None, None, None, None)
    image = Image(
        dataset_id=dataset.id,
        path=rel,
        sha256=meta.sha256,
        width=meta.width,
        height=meta.height,
        slide_id=slide.id if slide else None,
        x0=x0,
        y0=y0,
        box_w=bw,
        box_h=bh,
    )
    session.add(image)
    session.flush()
    return image


# --- labels ------------------------------------------------------------------------------------


def _upsert(session: Session, table, rows: list[dict], conflict: list[str], update: list[str]) -> None:
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
    if insert is None:
        raise StoreError(f"Upserts are implemented for SQLite and PostgreSQL, not {dialect}.")
    stmt = insert(table)
    stmt = stmt.on_conflict_do_update(index_elements=conflict, set_={c: stmt.excluded[c] for c in update})
    session.execute(stmt, rows)


def set_labels_bulk(
    session: Session,
    rows: Sequence[tuple[int, int, list[str], bool, str]],
    *,
    source: str,
    suggested: str | None = None,
    suggested_by: str | None = None,
) -> None:
    """Write (image_id, annotator_id, classes, uncertain, note) rows: current label + history.

    ``suggested`` / ``suggested_by``: the model's class shown while these labels were given, and
    the checkpoint id that made it (None: no suggestion was shown). Classes must already be
    validated. One statement per table, so cost per label is flat.
    """
    if not rows:
        return
    now = utcnow()
    shown = dict(suggested=suggested, suggested_by=suggested_by)
    label_rows = [
        dict(image_id=i, annotator_id=a, classes=c, uncertain=u, note=n, updated_at=now, **shown)
        for i, a, c, u, n in rows
    ]
    _upsert(
        session,
        Label.__table__,
        label_rows,
        ["image_id", "annotator_id"],
        ["classes", "uncertain", "note", "updated_at", "suggested", "suggested_by"],
    )
    session.execute(
        LabelEvent.__table__.insert(),
        [
            dict(image_id=i, annotator_id=a, action="set", classes=c, uncertain=u, note=n, source=source, at=now,
                 **shown)
            for i, a, c, u, n in rows
        ],
    )


def set_label(
    session: Session,
    image: Image,
    annotator: Annotator | str,
    classes: Iterable[str],
    *,
    uncertain: bool = False,
    note: str = "",
    source: str = "app",
    suggested: str | None = None,
    suggested_by: str | None = None,
) -> Label:
    """Set ``annotator``'s current label of ``image`` and append it to the history; ``suggested``
    is the model's class on screen when it was given (``suggested_by``: its checkpoint id)."""
    dataset = image.dataset
    keys = validate_classes(dataset, classes, where=image.path)
    if not keys and not uncertain:
        raise InvalidLabelError(f"{image.path}: a label needs a class (or the uncertain flag)")
    if isinstance(annotator, str):
        annotator = get_or_create_annotator(session, annotator)
    set_labels_bulk(session, [(image.id, annotator.id, keys, uncertain, note)], source=source,
                    suggested=suggested, suggested_by=suggested_by)
    session.expire_all()
    return session.scalar(select(Label).where(Label.image_id == image.id, Label.annotator_id == annotator.id))


def clear_label(session: Session, image: Image, annotator: Annotator | str, *, source: str = "app") -> bool:
    """Remove an annotator's current label (the history keeps it). True if there was one."""
    if isinstance(annotator, str):
        annotator = get_or_create_annotator(session, annotator)
    label = session.scalar(select(Label).where(Label.image_id == image.id, Label.annotator_id == annotator.id))
    if label is None:
        return False
    session.add(
        LabelEvent(
            image_id=image.id,
            annotator_id=annotator.id,
            action="clear",
            classes=list(label.classes),
            uncertain=label.uncertain,
            note=label.note,
            source=source,
        )
    )
    session.delete(label)
    session.flush()
    return True


def label_history(session: Session, image: Image) -> list[LabelEvent]:
    return list(session.scalars(select(LabelEvent).where(LabelEvent.image_id == image.id).order_by(LabelEvent.id)))


def adjudicate(
    session: Session, image: Image, decided_by: Annotator | str, classes: Iterable[str], *, note: str = ""
) -> Adjudication:
    """Set the final label of ``image``; a later decision replaces it (both stay in the history)."""
    keys = validate_classes(image.dataset, classes, where=image.path)
    if not keys:
        raise InvalidLabelError(f"{image.path}: an adjudication needs a class")
    if isinstance(decided_by, str):
        decided_by = get_or_create_annotator(session, decided_by)
    adj = session.scalar(select(Adjudication).where(Adjudication.image_id == image.id))
    if adj is None:
        adj = Adjudication(image_id=image.id, decided_by_id=decided_by.id, classes=keys, note=note)
        session.add(adj)
    else:
        adj.classes, adj.decided_by_id, adj.note, adj.decided_at = keys, decided_by.id, note, utcnow()
    session.add(
        LabelEvent(
            image_id=image.id, annotator_id=decided_by.id, action="adjudicate", classes=keys, note=note, source="adjudication"
        )
    )
    session.flush()
    return adj


def prediction_margin(probs: dict[str, float]) -> float:
    """Top-1 minus top-2 probability: 0 = the model cannot tell, 1 = certain."""
    top = sorted((float(p) for p in probs.values()), reverse=True) + [0.0, 0.0]
    return top[0] - top[1]


def add_prediction(session: Session, image: Image, checkpoint_id: str, probs: dict[str, float]) -> Prediction:
    unknown = set(probs) - set(image.dataset.class_keys)
    if unknown:
        raise InvalidLabelError(f"{image.path}: prediction for unknown classes {sorted(unknown)}")
    predicted = max(probs, key=probs.__getitem__)
    pred = Prediction(image_id=image.id, checkpoint_id=checkpoint_id, probs=dict(probs), predicted=predicted,
                      margin=prediction_margin(probs))
    session.add(pred)
    session.flush()
    return pred
