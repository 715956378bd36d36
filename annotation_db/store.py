"""Queries and writes of the annotation store. Every function takes a session; the caller owns
the transaction (``with Session() as s, s.begin(): ...``), so a batch of calls is all-or-nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from annotation_db.db import StoreError
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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class DatasetNotFoundError(StoreError):
    pass


class DatasetExistsError(StoreError):
    pass


class InvalidLabelError(StoreError):
    pass


class ImageFileError(StoreError):
    """An image file is missing, unreadable, or outside the dataset's root."""


class ImageTooLargeError(ImageFileError):
    """An image has more bytes or pixels than a crop may (a slide, or a decompression bomb)."""


@dataclass(frozen=True)
class ImageLimits:
    """What one crop may be, checked before anything is decoded. The viewer's upload limits by
    default; ``GLOM_IMPORT_MAX_BYTES`` and ``GLOM_IMPORT_MAX_PIXELS`` change them."""

    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 40_000_000  # e.g. 6300 × 6300: far above any glomerulus crop
    max_side_px: int = 16_384

    @classmethod
    def from_env(cls) -> ImageLimits:
        def number(name: str, default: int) -> int:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return default
            try:
                return int(float(raw))
            except ValueError:
                raise StoreError(f"{name}={raw!r} is not a number") from None

        return cls(number("GLOM_IMPORT_MAX_BYTES", cls.max_bytes), number("GLOM_IMPORT_MAX_PIXELS", cls.max_pixels))


# magic bytes of the image types a crop may be
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
                (b"BM", "bmp"))


def sniff_image_type(head: bytes) -> str | None:
    """png, jpeg, tiff, bmp or webp as the file's first bytes announce it (names are not trusted)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((kind for magic, kind in _IMAGE_MAGIC if head.startswith(magic)), None)


@dataclass(frozen=True)
class ClassSpec:
    key: str
    display_name: str
    hotkey: str | None = None


GLOMERULUS_CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("normal", "正常肾小球", "1"),
    ClassSpec("segmental_sclerosis", "节段性硬化", "2"),
    ClassSpec("mesangial_proliferation", "系膜细胞增生", "3"),
    ClassSpec("crescent", "新月体形成", "4"),
)

# Annotators named so are models (the viewer's "I disagree" records the model's call this way).
MODEL_ANNOTATOR_PREFIX = "model:"

# Where a label comes from when exporting or training.
LABEL_SOURCES = ("majority", "adjudicated", "final", "annotator:<name>")


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
class ImageMeta:
    sha256: str
    width: int
    height: int


# --- datasets, annotators, slides -------------------------------------------------------------


def default_hotkey(position: int) -> str | None:
    return str(position + 1) if position < 9 else ("0" if position == 9 else None)


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


def read_image_meta(path: Path, limits: ImageLimits | None = None) -> ImageMeta:
    """sha256 of the file's bytes and its pixel size, within ``limits`` (default: from the
    environment, see :class:`ImageLimits`).

    Nothing large is read before it is known to be an image of an acceptable size: the type comes
    from the first bytes, the size in bytes from the file system, the pixel size from the header;
    then the bytes are hashed in a stream. Raises :class:`ImageTooLargeError` over the limits and
    :class:`ImageFileError` for anything that is not a readable PNG, JPEG or TIFF.
    """
    limits = limits or ImageLimits.from_env()
    try:
        with path.open("rb") as f:
            head = f.read(16)
            size_bytes = os.fstat(f.fileno()).st_size
            kind = sniff_image_type(head)
            if kind is None:
                raise ImageFileError(f"{path}: not an image (its first bytes are not those of a PNG, JPEG or TIFF file)")
            if size_bytes > limits.max_bytes:
                raise ImageTooLargeError(f"{path}: {size_bytes / 2**20:.1f} MiB is over the limit of "
                                         f"{limits.max_bytes / 2**20:.0f} MiB for one crop (GLOM_IMPORT_MAX_BYTES)")
            f.seek(0)
            width, height = _header_size(path, f, limits)
            f.seek(0)
            digest = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise ImageFileError(f"{path}: file not found") from None
    except OSError as e:
        raise ImageFileError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    return ImageMeta(digest.hexdigest(), width, height)


def _header_size(path: Path, f, limits: ImageLimits) -> tuple[int, int]:  # noqa: ANN001 - a binary file
    """(width, height) from the image header, refusing more pixels than ``limits`` allow."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # our limit decides
            with PILImage.open(f) as im:
                width, height = im.size
    except PILImage.DecompressionBombError:
        width = height = None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageFileError(f"{path}: not an image PIL can read (expected PNG, JPEG or TIFF)") from None
    if width is None or width * height > limits.max_pixels or max(width, height) > limits.max_side_px:
        shown = "far too many pixels" if width is None else f"{width}×{height} pixels"
        raise ImageTooLargeError(
            f"{path}: {shown} is over the limit of {limits.max_pixels / 1e6:.0f} megapixels or "
            f"{limits.max_side_px} px a side for one crop (GLOM_IMPORT_MAX_PIXELS); cut crops from slides with "
            "`glom extract`")
    return width, height


@lru_cache(maxsize=64)
def _resolved_root(root: str) -> Path:
    return Path(root or ".").resolve()


def resolve_in_root(dataset: Dataset, rel_path: str) -> Path:
    """Absolute path of ``rel_path`` under the dataset's root; refuses paths that escape it.

    The check is on the normalised text (``..``, absolute paths): a data tree reached through a
    symbolic link stays usable, and the check costs no file-system call per image.
    """
    root = _resolved_root(dataset.root)
    norm = posixpath.normpath(rel_path.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or posixpath.isabs(norm):
        raise ImageFileError(f"{rel_path}: resolves outside the data root {root}")
    return root / norm


def normalize_rel_path(dataset: Dataset, path: str | Path) -> str:
    """A POSIX path relative to the dataset root (absolute paths must lie inside the root)."""
    text = str(path)
    if posixpath.isabs(text) or os.path.isabs(text):
        root = _resolved_root(dataset.root)
        rp = Path(text).resolve()
        if not rp.is_relative_to(root):
            raise ImageFileError(f"{path}: outside the data root {root}")
        text = rp.relative_to(root).as_posix()
    resolve_in_root(dataset, text)
    return posixpath.normpath(text.replace("\\", "/"))


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


def image_abspath(dataset: Dataset, image: Image) -> Path:
    return Path(dataset.root or ".") / image.path


# --- labels ------------------------------------------------------------------------------------


def validate_classes(dataset: Dataset, classes: Iterable[str], *, where: str = "") -> list[str]:
    """Class keys checked against the schema and returned in schema order."""
    keys = dataset.class_keys
    wanted = list(dict.fromkeys(classes))
    unknown = [c for c in wanted if c not in keys]
    prefix = f"{where}: " if where else ""
    if unknown:
        raise InvalidLabelError(
            f"{prefix}unknown class {', '.join(map(repr, unknown))} for dataset {dataset.name!r} "
            f"(its classes: {', '.join(keys)})"
        )
    if not dataset.multi_label and len(wanted) > 1:
        raise InvalidLabelError(
            f"{prefix}dataset {dataset.name!r} is single-label but got {len(wanted)} classes {wanted}"
        )
    return [k for k in keys if k in wanted]


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


# --- resolving labels (export, training, agreement) -------------------------------------------


@dataclass
class ResolvedLabels:
    """Classes per image id for one label source, and the images it could not decide."""

    by_image: dict[int, list[str]] = field(default_factory=dict)
    undecided: list[int] = field(default_factory=list)  # ties under majority vote


def is_model_annotator(name: str) -> bool:
    """Labels by ``model:<checkpoint>`` record what a model said, not what a person decided."""
    return name.startswith(MODEL_ANNOTATOR_PREFIX)


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
