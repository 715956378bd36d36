"""Slide annotations → crops in a dataset of the annotation store.

What lies between the extraction engine (:mod:`core.extract`, which cuts files) and the store:

- :data:`SLIDE_CROP_SETTINGS`: how the apps cut a glomerulus (0.5 µm/px, 16 px margin), the one
  setting the labeling app's Slide workspace and the diagnosis viewer share.
- :func:`slide_box_annotation` / :func:`boxes_to_geojson` / :func:`export_boxes_geojson`: a
  slide's glomeruli (``SlideBox`` rows: drawn, accepted, imported; their outline when they have
  one) as annotations, and as QuPath GeoJSON with the detector's still-proposed findings.
- :func:`check_outlines` / :func:`store_outlines`: the outlines of an annotation file as slide
  boxes (source ``import:<file>``), which ``glom extract --dataset`` stores with their crops.
- :func:`slide_annotations`: a slide's annotations from a file, else its drawn boxes.
- :func:`with_class_keys`: annotation classes (key or display name, any case) as class keys, by
  the store's one rule (:class:`annotation_db.classes.ClassKeys`).
- :func:`prepare_dataset`, :func:`register_crops`, :class:`StoreRegistrar`: the dataset crops
  go to, and their registration (slide, level-0 box, label), for ``glom extract``.
- :func:`crop_into_dataset`: cut one slide's boxes into a dataset now; the Slide workspace's
  "crop" button and the viewer's whole-slide batch both call it.

Functions take a session; the caller owns the transaction.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from annotation_db import store
from annotation_db.boxes import (
    OutlineError,
    add_box,
    list_boxes,
    outline_box,
    outline_ring,
)
from annotation_db.classes import (
    GLOMERULUS_CLASSES,
    ClassKeys,
    schema_for,
    validate_classes,
)
from annotation_db.images import normalize_rel_path
from annotation_db.models import (
    Dataset,
    GlomerulusProposal,
    Image,
    Label,
    Slide,
    SlideBox,
)
from core.annotations import (
    Annotation,
    AnnotationFormatError,
    annotations_for_slide,
    geojson_feature,
    read_annotations,
)
from core.extract import (
    CropJob,
    CropSettings,
    ExtractError,
    ExtractReport,
    SlideInfo,
    SlideTask,
    extract_crops,
)
from core.wsi import Box, SlideError, slide_name

log = logging.getLogger(__name__)

__all__ = ["PROPOSED_CLASS", "SLIDE_CROP_SETTINGS", "SlideCrop", "SlideCrops", "StoreRegistrar", "boxes_to_geojson",
           "check_outlines", "crop_into_dataset", "export_boxes_geojson", "prepare_dataset", "register_crops",
           "slide_annotations", "slide_box_annotation", "store_outlines", "with_class_keys"]

# Crops the apps cut: the resolution of the training crops, with a margin around the glomerulus.
SLIDE_CROP_SETTINGS = CropSettings(mpp=0.5, pad_px=16)


# --- a slide's glomeruli: boxes drawn, accepted or imported ------------------------------------

PROPOSED_CLASS = "Glomerulus (proposed)"  # QuPath class of the detector's findings nobody decided yet
PROPOSED_COLOR = (255, 152, 0)  # the workspace's colour for them


def slide_box_annotation(box: SlideBox) -> Annotation:
    """A slide box as an annotation (source ``slide_box:<id>``): its outline when it has one, else
    its rectangle. Cropping it cuts the outline's bounds, i.e. the box."""
    if box.polygon:
        return Annotation("polygon", tuple((float(x), float(y)) for x, y in box.polygon), box.label,
                          source=f"slide_box:{box.id}")
    return Annotation.rectangle(box.x0, box.y0, box.box_w, box.box_h, box.label, source=f"slide_box:{box.id}")


def boxes_to_geojson(boxes: Iterable[SlideBox], proposals: Iterable[GlomerulusProposal] = ()) -> dict:
    """QuPath GeoJSON FeatureCollection (``objectType: annotation``) of a slide's glomeruli.

    Each box is a Polygon of its outline when it has one, else of its rectangle; its class key is
    the classification. Of ``proposals``, the still-proposed ones follow as class
    :data:`PROPOSED_CLASS` with their outline and ``measurements.score``; an accepted one is
    already there as the box accepting drew (once), or, its box gone, unclassified with its
    score; rejected ones are left out (no glomerulus: they stay in the store as the detector's
    hard negatives)."""
    features = [geojson_feature(slide_box_annotation(b), source=b.source) for b in boxes]
    for p in proposals:
        if p.status == "rejected" or (p.status == "accepted" and p.slide_box_id is not None):
            continue
        label = PROPOSED_CLASS if p.status == "proposed" else None
        ann = Annotation("polygon", tuple((float(x), float(y)) for x, y in p.polygon), label,
                         source=f"proposal:{p.id}")
        features.append(geojson_feature(ann, color=PROPOSED_COLOR, measurements={"score": round(p.score, 4)},
                                        source=p.source))
    return {"type": "FeatureCollection", "features": features}


def export_boxes_geojson(session: Session, slide: Slide, dataset: Dataset | None = None, *,
                         proposals: bool = True) -> dict:
    """The glomeruli of ``slide`` (boxes drawn, accepted or imported) and, with ``proposals``, the
    detector's proposals of ``dataset`` (any dataset when None) as QuPath GeoJSON
    (:func:`boxes_to_geojson`)."""
    found: list[GlomerulusProposal] = []
    if proposals:
        q = select(GlomerulusProposal).where(GlomerulusProposal.slide_id == slide.id)
        if dataset is not None:
            q = q.where(GlomerulusProposal.dataset_id == dataset.id)
        found = list(session.scalars(q.order_by(GlomerulusProposal.score.desc(), GlomerulusProposal.id)))
    return boxes_to_geojson(list_boxes(session, slide), found)


# --- outlines of an annotation file as slide boxes ---------------------------------------------


def _origin(a: Annotation) -> tuple[str, str]:
    """(file name, place in the file) of an annotation a reader of :mod:`core.annotations` made."""
    if "#" in a.source:
        path, index = a.source.rsplit("#", 1)
        what = "feature" if Path(path).suffix.lower() in (".geojson", ".json") else "annotation"
        return Path(path).name, f"{what} {index}"
    path, _, line = a.source.rpartition(":")
    if path and line.isdigit():
        return Path(path).name, f"line {line}"
    return Path(a.source).name or "annotations", ""


def _outline(a: Annotation) -> tuple[tuple[int, int, int, int], list[list[float]] | None]:
    """(box, outline or None) of an annotation: a polygon's checked ring, a rectangle's or an
    ellipse's bounding box alone (an ellipse is its inscribed ellipse wherever the box is used)."""
    if a.kind == "polygon":
        try:
            ring = outline_ring(a.vertices)
        except OutlineError as e:
            file, where = _origin(a)
            raise AnnotationFormatError(f"{file}: {where}: {e}") from None
        return outline_box(ring), ring
    return outline_box(a.vertices), None


def check_outlines(annotations: Iterable[Annotation]) -> None:
    """Raise :class:`AnnotationFormatError` naming the file and the feature (GeoJSON) / annotation
    (XML) of the first polygon that is no simple polygon, before anything is cut or stored."""
    for a in annotations:
        if a.kind != "point":
            _outline(a)


def store_outlines(session: Session, slide: Slide, annotated: Iterable[tuple[Annotation, int | None]], *,
                   created_by: str) -> int:
    """Store the glomeruli of annotations read from a file as boxes of ``slide``: a polygon with its
    outline, a rectangle or an ellipse as its box; points (no extent) are skipped. Each pair is an
    annotation and the image it was cropped into (None: not cropped). Source ``import:<file
    name>``, attributed to ``created_by``. Idempotent: a box of the slide with the same place and
    outline is reused (and gets the crop if it had none), whoever drew it. Returns how many boxes
    are new."""
    existing = {(b.box, _ring_key(b.polygon)): b for b in list_boxes(session, slide)}
    n_new = 0
    for a, image_id in annotated:
        if a.kind == "point":
            continue
        box, ring = _outline(a)
        row = existing.get((box, _ring_key(ring)))
        if row is None:
            row = add_box(session, slide, box, created_by=created_by, label=a.label, polygon=ring,
                          source=f"import:{_origin(a)[0]}")
            existing[(row.box, _ring_key(ring))] = row
            n_new += 1
        if row.image_id is None and image_id is not None:
            row.image_id = image_id
    session.flush()
    return n_new


def _ring_key(ring: Sequence[Sequence[float]] | None) -> tuple | None:
    return tuple((float(x), float(y)) for x, y in ring) if ring else None


def slide_annotations(session: Session | None, slide_path: str | Path,
                      annotation_file: str | Path | None) -> tuple[list[Annotation], str]:
    """The annotations of one slide and where they came from: those of ``annotation_file``
    (QuPath GeoJSON, ImageScope/ASAP XML, CSV) that belong to the slide, else the boxes drawn on
    it in the labeling app's Slide workspace. Raises :class:`AnnotationFormatError` saying what is
    missing or wrong."""
    slide_path = Path(slide_path)
    if annotation_file:
        every = read_annotations(annotation_file)
        mine = annotations_for_slide(every, slide_path)
        if every and not mine:
            named = sorted({a.slide for a in every if a.slide})
            raise AnnotationFormatError(
                f"{Path(annotation_file).name}: none of its {len(every)} annotations is for slide {slide_path.name} "
                f"(they name {', '.join(named[:5])}{' …' if len(named) > 5 else ''})")
        if not mine:
            raise AnnotationFormatError(f"{Path(annotation_file).name}: no annotations in the file")
        return mine, Path(annotation_file).name
    slide = session.scalar(select(Slide).where(Slide.name == slide_name(slide_path))) if session else None
    boxes = list_boxes(session, slide) if slide is not None else []
    if not boxes:
        raise AnnotationFormatError(
            f"slide {slide_path.name} has no annotations: upload its annotation file (QuPath GeoJSON, Aperio "
            "ImageScope or ASAP XML, CSV of boxes) or draw boxes on it in the labeling app's Slide workspace")
    return [slide_box_annotation(b) for b in boxes], f"{len(boxes)} boxes drawn in the labeling app"


def with_class_keys(annotations: Sequence[Annotation], class_keys: ClassKeys, *,
                    unknown: Literal["refuse", "ignore"] = "refuse") -> tuple[list[Annotation], dict[str, int]]:
    """``annotations`` with their class names replaced by class keys, and the names that are no
    class with how often they occur. ``unknown="refuse"`` raises
    :class:`annotation_db.classes.UnknownClassError` (naming the annotation) for the first of them;
    ``"ignore"`` keeps such annotations without a class."""
    out, ignored = [], Counter()
    for a in annotations:
        if not a.label:
            out.append(a)
            continue
        if unknown == "refuse":
            out.append(replace(a, label=class_keys.key(a.label, where=a.source)))
            continue
        key = class_keys.get(a.label)
        if key is None:
            ignored[a.label] += 1
        out.append(replace(a, label=key))
    return out, dict(ignored)


# --- registration -------------------------------------------------------------------------------


def register_crops(
    session: Session,
    dataset: Dataset,
    info: SlideInfo,
    jobs: Sequence[CropJob],
    *,
    annotator: str,
    stain: str | None = None,
    source: str = "import:wsi",
) -> tuple[list[Image], int]:
    """Register ``jobs``' crop files as images of ``dataset`` with their slide and level-0 box,
    and label them (by ``annotator``) where the job has a class key. Idempotent.

    Returns the images in ``jobs`` order and how many were new.
    """
    slide = store.get_or_create_slide(session, info.name, path=str(info.path), stain=stain, mpp=info.mpp)
    images, n_new = [], 0
    for job in jobs:
        rel = normalize_rel_path(dataset, job.path)
        image = store.find_image(session, dataset, rel)
        if image is None:
            image = store.add_image(session, dataset, rel, slide=slide, box=job.box)
            n_new += 1
        images.append(image)
    labelled = [(job, img) for job, img in zip(jobs, images, strict=True) if job.label]
    if labelled:
        who = store.get_or_create_annotator(session, annotator)
        have = set(
            session.scalars(
                select(Label.image_id).where(
                    Label.annotator_id == who.id, Label.image_id.in_([img.id for _, img in labelled])
                )
            )
        )
        rows = [
            (img.id, who.id, validate_classes(dataset, [job.label], where=str(job.path)), False, "")
            for job, img in labelled
            if img.id not in have
        ]
        store.set_labels_bulk(session, rows, source=source)
    return images, n_new


class StoreRegistrar:
    """``register`` for :func:`core.extract.extract_crops`: each finished slide in its own transaction.

    ``outlines``: the annotations by source (``Annotation.source``); those a crop was cut from are
    stored as the slide's boxes with their outline and that crop (:func:`store_outlines`)."""

    def __init__(self, Session: sessionmaker, dataset_name: str, *, annotator: str,
                 stain: str | None = None, source: str = "import:wsi",
                 outlines: Mapping[str, Annotation] | None = None) -> None:
        self.Session = Session
        self.dataset_name = dataset_name
        self.annotator = annotator
        self.stain = stain
        self.source = source
        self.outlines = dict(outlines or {})

    def __call__(self, info: SlideInfo, jobs: list[CropJob]) -> int:
        with self.Session() as s, s.begin():
            dataset = store.get_dataset(s, self.dataset_name)
            images, n_new = register_crops(s, dataset, info, jobs, annotator=self.annotator, stain=self.stain,
                                           source=self.source)
            pairs = [(self.outlines[src], image.id) for job, image in zip(jobs, images, strict=True)
                     for src in job.sources if src in self.outlines]
            if pairs:
                slide = store.get_or_create_slide(s, info.name, path=str(info.path))
                store_outlines(s, slide, pairs, created_by=self.annotator)
        return n_new


def prepare_dataset(
    session: Session,
    name: str,
    out_dir: str | Path,
    annotations: Sequence[Annotation],
    *,
    classes: Sequence[str] | None = None,
) -> Dataset:
    """The dataset crops go to (map the annotation classes to its keys with :func:`with_class_keys`).

    The dataset is created (root = ``out_dir``) if missing, with ``classes`` or the annotation
    classes in order of appearance (:func:`annotation_db.classes.schema_for`). Checked before
    any crop is cut: ``out_dir`` lies under its root, and every annotation class names one of
    its classes (:class:`annotation_db.classes.UnknownClassError` naming the annotation).
    """
    out_dir = Path(out_dir).resolve()
    labels = [a.label for a in annotations if a.label]
    schema = schema_for(list(classes or dict.fromkeys(labels))) or list(GLOMERULUS_CLASSES)
    dataset = store.get_or_create_dataset(session, name, schema, root=out_dir)
    root = Path(dataset.root or ".").resolve()
    if not out_dir.is_relative_to(root):
        raise ExtractError(
            f"--out {out_dir} is outside the root {root} of dataset {name!r}: write the crops inside it "
            f"(e.g. --out {root / 'wsi'})"
        )
    with_class_keys(annotations, ClassKeys.of(dataset))
    return dataset


# --- cutting a slide's boxes into a dataset now ---------------------------------------------------


@dataclass(frozen=True)
class SlideCrop:
    """One crop cut from a slide and registered in the store."""

    image_id: int
    path: Path  # absolute
    slide: str
    box: Box  # level-0 (x, y, w, h) of the crop
    label: str | None  # the class key its annotation names (None: no class, or not a class of the dataset)
    source: str  # where in the annotations it came from


@dataclass
class SlideCrops:
    """What :func:`crop_into_dataset` did."""

    crops: list[SlideCrop]
    report: ExtractReport
    n_annotations: int
    ignored_labels: dict[str, int]  # annotation classes that are no class of the dataset -> count


def _as_annotations(boxes: Sequence[SlideBox | Annotation | Box]) -> tuple[list[Annotation], dict[str, SlideBox]]:
    anns: list[Annotation] = []
    rows: dict[str, SlideBox] = {}
    for i, b in enumerate(boxes):
        if isinstance(b, SlideBox):
            anns.append(slide_box_annotation(b))
            rows[anns[-1].source] = b
        elif isinstance(b, Annotation):
            anns.append(b)
        else:
            x, y, w, h = b
            anns.append(Annotation.rectangle(x, y, w, h, source=f"box[{i}]"))
    return anns, rows


def crop_into_dataset(
    session: Session,
    dataset: Dataset | str,
    slide_path: str | Path,
    boxes: Sequence[SlideBox | Annotation | Box],
    *,
    annotator: str | None,
    settings: CropSettings = SLIDE_CROP_SETTINGS,
    mpp: float | None = None,
    stain: str | None = None,
    out_dir: str | Path | None = None,
    source: str = "app:slides",
    unknown_classes: Literal["refuse", "ignore"] = "refuse",
    progress: bool = False,
) -> SlideCrops:
    """Cut the boxes of one slide into ``dataset`` now and register each crop with its slide,
    stain and level-0 box (idempotent: crops already cut with the same settings are reused).

    ``boxes``: ``SlideBox`` rows (each gets ``image_id`` set), :class:`Annotation` objects or
    level-0 ``(x, y, w, h)`` tuples; their classes go through :func:`with_class_keys`
    (``unknown_classes``). ``annotator``: who the classes are stored as labels of; None stores
    no labels (the viewer shows the annotation classes beside its predictions, it does not
    import them). ``mpp``: µm/px for a slide that records none. Crops go to ``out_dir``
    (default ``<dataset root>/wsi``). Boxes refused or clipped are listed in the report.

    Raises :class:`SlideError` when the slide cannot be read (nothing is registered, no crop
    stays) and :class:`annotation_db.classes.UnknownClassError` for a class that is none of the
    dataset's (with ``unknown_classes="refuse"``).
    """
    ds = dataset if isinstance(dataset, Dataset) else store.get_dataset(session, dataset)
    if not ds.root and out_dir is None:
        raise ExtractError(f"dataset {ds.name!r} has no root folder; pass out_dir")
    out = Path(out_dir) if out_dir is not None else Path(ds.root) / "wsi"
    anns, rows = _as_annotations(boxes)
    keyed, ignored = with_class_keys(anns, ClassKeys.of(ds), unknown=unknown_classes)
    cut: list[SlideCrop] = []

    def register(info: SlideInfo, jobs: list[CropJob]) -> int:
        stored = jobs if annotator else [replace(j, label=None) for j in jobs]
        images, n_new = register_crops(session, ds, info, stored, annotator=annotator or "", stain=stain,
                                       source=source)
        for job, image in zip(jobs, images, strict=True):
            cut.append(SlideCrop(image.id, Path(job.path), info.name, tuple(job.box), job.label,
                                 ",".join(job.sources)))
            for src in job.sources:
                if src in rows:
                    rows[src].image_id = image.id
        session.flush()
        return n_new

    report = extract_crops([SlideTask(Path(slide_path), keyed, mpp)], out, settings, workers=1, register=register,
                           progress=progress)
    if report.failed:
        raise SlideError("; ".join(report.failed.values()))
    return SlideCrops(cut, report, len(anns), ignored)
