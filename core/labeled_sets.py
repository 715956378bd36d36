"""Labeled image sets: the class schema plus one :class:`Sample` per image, from the annotation
store, a class-per-folder tree, a CSV or the seed system's JSONL (:func:`load_labeled_set`).

Also where a sample's groups come from (slide, patient, centre) and where the shared real data
lives. Splitting a set is :mod:`core.splits`; feeding it to torch is :mod:`core.torch_data`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from core.errors import GlomError

log = logging.getLogger(__name__)

__all__ = [
    "GROUP_BY",
    "DataError",
    "LabeledSet",
    "Sample",
    "assign_centres",
    "load_from_csv",
    "load_from_folder",
    "load_from_jsonl",
    "load_from_store",
    "load_labeled_set",
    "shared_data_dir",
]


class DataError(GlomError, ValueError):
    """The labeled data cannot be read or split as asked; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    """One labeled image: absolute path, class index, and the slide/patient it comes from."""

    path: str
    label: int
    slide: str | None = None
    patient: str | None = None
    stain: str | None = None
    image_id: int | None = None
    centre: str | None = None  # the hospital / scanner site (a CSV column or a slide-id pattern)


@dataclass
class LabeledSet:
    """Class schema (keys, in order; display names) and samples."""

    classes: list[str]
    samples: list[Sample]
    display_names: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.display_names:
            self.display_names = list(self.classes)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def counts(self) -> list[int]:
        """Number of samples per class, in schema order."""
        c = Counter(self.labels)
        return [c.get(i, 0) for i in range(len(self.classes))]

    def groups(self, group_by: str = "slide") -> list[str]:
        """Group name of each sample (``slide``, ``patient``, ``centre`` or ``none``); ungrouped samples stand alone.

        ``patient`` falls back to the slide for samples whose slide records no patient, so a
        slide is never split either way (``glom patients`` fills the patients in). ``centre``
        has no fallback: every sample must have one (:func:`assign_centres`).
        """
        if group_by not in GROUP_BY:
            raise DataError(f"group_by must be one of {', '.join(GROUP_BY)}, not {group_by!r}")
        if group_by == "centre":
            missing = [s.path for s in self.samples if not s.centre]
            if missing:
                raise DataError(f"{len(missing)} of {len(self.samples)} images have no centre, e.g. {missing[0]}: "
                                f"add a `centre` column or set data.centre_pattern (a regex on the slide id)")
            return [f"centre:{s.centre}" for s in self.samples]
        out, no_patient = [], 0
        for i, s in enumerate(self.samples):
            if group_by == "patient":
                g = f"patient:{s.patient}" if s.patient else (f"slide:{s.slide}" if s.slide else None)
                no_patient += not s.patient
            else:
                g = None if group_by == "none" else s.slide
            out.append(g if g is not None else f"__image_{i}")
        if no_patient:
            log.warning("%d of %d images have no patient (grouped by their slide instead): record patients with "
                        "`glom patients FILE.csv`", no_patient, len(self.samples))
        return out


GROUP_BY = ("slide", "patient", "centre", "none")


def assign_centres(ls: LabeledSet, pattern: str = "") -> LabeledSet:
    """Fill each sample's centre from ``pattern``, a regex searched in the slide id (group 1, or the
    whole match). Samples that already have a centre (a CSV column) keep it. ``^([^_]+)_`` gives the
    shared set's ``SAS`` / ``SESCAM`` / ``VUHSK``. A slide the pattern does not match is an error
    naming it (a silently unassigned centre would leak between the training and test side).
    """
    import re

    if not pattern:
        return ls
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise DataError(f"data.centre_pattern {pattern!r} is not a regular expression: {e}") from None
    out = []
    for s in ls.samples:
        if s.centre:
            out.append(s)
            continue
        m = rx.search(s.slide or "")
        if not m:
            raise DataError(f"data.centre_pattern {pattern!r} does not match the slide id {s.slide!r} of {s.path}")
        centre = m.group(1) if rx.groups else m.group(0)
        out.append(replace(s, centre=centre))
    return LabeledSet(ls.classes, out, ls.display_names, ls.source)


def shared_data_dir() -> Path:
    """The shared real-data folder: ``$GLOM_SHARED_DATA`` or ``../shared/data`` beside the repo."""
    import os

    env = os.environ.get("GLOM_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _single_label(where: str, classes: Sequence[str] | None, index: dict[str, int]) -> int | None:
    if not classes:
        return None
    if len(classes) != 1:
        log.warning("%s: %d classes %s; single-label training skips it", where, len(classes), list(classes))
        return None
    if classes[0] not in index:
        raise DataError(f"{where}: class {classes[0]!r} is not in the schema {list(index)}")
    return index[classes[0]]


def load_from_store(dataset: str, source: str = "majority", db_url: str | None = None) -> LabeledSet:
    """Images of a store dataset with labels from ``source``: ``majority``, ``adjudicated``, ``final``
    (adjudicated where decided, else majority) or ``annotator:NAME``."""
    from annotation_db.db import open_store
    from annotation_db.label_resolution import labeled_items
    from annotation_db.store import get_dataset

    Session = open_store(db_url)
    with Session() as session:
        ds = get_dataset(session, dataset)
        if ds.multi_label:
            log.warning("dataset %s is multi-label; images with more than one class are skipped", dataset)
        keys = [c.key for c in ds.classes]
        names = [c.display_name for c in ds.classes]
        items = labeled_items(session, dataset, source=source)
        stain_of = _slide_stains(session)
    index = {k: i for i, k in enumerate(keys)}
    samples = []
    for it in items:
        label = _single_label(f"image {it.path}", it.classes, index)
        if label is not None:
            samples.append(Sample(it.path, label, it.slide, it.patient,
                                  stain_of.get(it.slide) if it.slide else None, it.image_id))
    if not samples:
        raise DataError(f"dataset {dataset!r} has no single-class labels from source {source!r}")
    return LabeledSet(keys, samples, names, source=f"store:{dataset}:{source}")


def _slide_stains(session) -> dict[str, str]:
    """Slide name → stain (``HE``, ``PAS``; slides marked ``other`` are left out)."""
    from sqlalchemy import select

    from annotation_db.models import Slide

    rows = session.execute(select(Slide.name, Slide.stain)).all()
    return {name: getattr(stain, "value", stain) for name, stain in rows if getattr(stain, "value", stain) != "other"}


def _slide_from_name(path: str) -> str | None:
    """Slide id from a crop name: before the last ``-`` (``SAS_21883_001-10``), else before the
    last ``_`` (the seed labeling system's ``0496052bb_10``); None when neither is there."""
    stem = Path(path).stem
    for sep in ("-", "_"):
        if sep in stem:
            return stem.rsplit(sep, 1)[0]
    return None


def load_from_folder(root: str | Path, slide_from_name: bool = True) -> LabeledSet:
    """A class-per-subfolder tree; the slide comes from the file name when asked (see ``_slide_from_name``).

    Sub-folders whose name starts with ``_`` or ``.`` (masks, caches) are not classes.
    """
    from annotation_db.formats import scan_folder

    root = Path(root).resolve()
    records = [r for r in scan_folder(root, labels_from_subfolders=True)
               if r.classes and not r.classes[0].startswith(("_", "."))]
    keys = sorted({r.classes[0] for r in records if r.classes})
    index = {k: i for i, k in enumerate(keys)}
    samples = [
        Sample(str(root / r.image), index[r.classes[0]], _slide_from_name(r.image) if slide_from_name else None)
        for r in records if r.classes
    ]
    return LabeledSet(keys, samples, source=f"folder:{root}")


def load_from_csv(path: str | Path, root: str | Path | None = None,
                  classes: Sequence[str] | None = None) -> LabeledSet:
    """``image,label[,annotator][,slide]`` or the shared ``path,label,slide_id,mask_path`` file.

    Paths resolve against ``root`` (default: the CSV's folder). Class order is ``classes`` or sorted.
    """
    from annotation_db.formats import read_csv

    path = Path(path)
    base = Path(root) if root else path.parent
    records = [r for r in read_csv(path) if r.classes]
    if any(r.annotator for r in records):
        log.warning("%s has an annotator column; every row is used as its own sample", path)
    keys = list(classes) if classes else sorted({c for r in records for c in r.classes})
    index = {k: i for i, k in enumerate(keys)}
    samples = []
    for r in records:
        label = _single_label(r.where, r.classes, index)
        if label is not None:
            samples.append(Sample(str((base / r.image).resolve()), label, r.slide, r.patient, centre=r.centre))
    return LabeledSet(keys, samples, source=f"csv:{path}")


def load_from_jsonl(path: str | Path, root: str | Path | None = None,
                    class_keys: Sequence[str] | None = None) -> LabeledSet:
    """The seed labeling system's JSONL (one-hot by display name); keys default to the names."""
    from annotation_db.formats import read_jsonl

    path = Path(path)
    base = Path(root) if root else path.parent
    names, records = read_jsonl(path)
    keys = list(class_keys) if class_keys else list(names)
    if len(keys) != len(names):
        raise DataError(f"{len(keys)} class keys given for the {len(names)} classes of {path}")
    index = {n: i for i, n in enumerate(names)}
    samples = []
    for r in records:
        label = _single_label(r.where, r.classes, index)
        if label is not None:
            samples.append(Sample(str((base / r.image).resolve()), label, _slide_from_name(r.image)))
    return LabeledSet(keys, samples, list(names), source=f"jsonl:{path}")


def load_labeled_set(kind: str, path: str = "", root: str = "", dataset: str = "",
                     label_source: str = "majority", db_url: str | None = None,
                     classes: Sequence[str] | None = None) -> LabeledSet:
    """Dispatch on ``kind``: ``store``, ``folder``, ``csv`` or ``jsonl``."""
    if kind == "store":
        ls = load_from_store(dataset, label_source, db_url)
    elif kind == "folder":
        ls = load_from_folder(path or root)
    elif kind == "csv":
        ls = load_from_csv(path, root or None, classes)
    elif kind == "jsonl":
        ls = load_from_jsonl(path, root or None, classes)
    else:
        raise DataError(f"unknown data kind {kind!r}: use store, folder, csv or jsonl")
    missing = [s.path for s in ls.samples if not Path(s.path).is_file()]
    if missing:
        raise DataError(f"{len(missing)} image files are missing, e.g. {missing[0]}")
    if len(ls.samples) == 0:
        raise DataError(f"no labeled images in {ls.source}")
    log.info("%s: %d images, counts %s", ls.source, len(ls.samples), dict(zip(ls.classes, ls.counts())))
    return ls
