"""What the labeling app shows next: queues of a dataset's images for one annotator.

Every query is a keyset page (``image.id > after ORDER BY image.id LIMIT n``) over an index, so
the cost of fetching the next crop does not grow with the store; nothing here loads every image.
Functions take a session; the caller owns the transaction. Results are plain dataclasses so the
app can cache them.

Queues (``QueueSpec.kind``):

- ``mine``: images this annotator has not labeled yet (blind: other labels are not consulted);
- ``all``: every image;
- ``slide``: every image of one slide;
- ``disagreements``: images whose annotators disagree and that nobody has adjudicated yet;
- ``uncertain``: images with a prediction from the dataset's model (its active checkpoint, set on
  the Models page, else the checkpoint whose predictions were stored last), most uncertain
  (smallest top-1 minus top-2 margin) first, not labeled by me; keyset pages on
  ``(margin, image id)`` over an index, so predictions the viewer adds appear at once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import Text, and_, cast, exists, func, or_, select
from sqlalchemy.orm import Session

from annotation_db.db import StoreError
from annotation_db.models import Adjudication, Annotator, Dataset, Image, Label, LabelEvent, Prediction, Slide

QUEUE_KINDS = ("mine", "all", "slide", "disagreements", "uncertain")
QUEUE_TITLES = {
    "mine": "My unlabeled",
    "all": "All images",
    "slide": "By slide",
    "disagreements": "Disagreements (adjudicate)",
    "uncertain": "Model-uncertain first",
}


class QueueError(StoreError):
    pass


@dataclass(frozen=True)
class QueueSpec:
    kind: str
    dataset_id: int
    annotator_id: int
    slide_id: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in QUEUE_KINDS:
            raise QueueError(f"unknown queue {self.kind!r}; use one of {', '.join(QUEUE_KINDS)}")
        if self.kind == "slide" and self.slide_id is None:
            raise QueueError("the 'slide' queue needs a slide: pick one first")


@dataclass(frozen=True)
class CropInfo:
    """One crop and where it came from (level-0 box on its slide, when known)."""

    image_id: int
    path: str  # relative to the dataset root
    width: int
    height: int
    slide_id: int | None = None
    slide_name: str | None = None
    slide_path: str | None = None
    stain: str | None = None
    box: tuple[int, int, int, int] | None = None  # level-0 (x, y, w, h)


@dataclass(frozen=True)
class LabelView:
    classes: tuple[str, ...]
    uncertain: bool
    note: str


@dataclass(frozen=True)
class Progress:
    done: int  # images of the dataset this annotator has labeled
    total: int
    per_class: dict[str, int] = field(default_factory=dict)  # my labels per class key
    uncertain: int = 0


# --- queues -------------------------------------------------------------------------------------


def _not_labeled_by(annotator_id: int):
    return ~exists().where(Label.image_id == Image.id, Label.annotator_id == annotator_id)


def next_image_ids(
    session: Session,
    spec: QueueSpec,
    after: int = 0,
    limit: int = 1,
    *,
    checkpoint_id: str | None = None,
) -> list[tuple[object, int]]:
    """The next ``limit`` images of the queue after cursor ``after``, as ``(cursor, image_id)``.

    The cursor is the image id for every queue but ``uncertain``, where it is the pair
    ``(margin, image id)`` of ``checkpoint_id``'s predictions (default: :func:`ranking_checkpoint`).
    Start with ``after=0``.
    """
    if spec.kind == "uncertain":
        ckpt = checkpoint_id or ranking_checkpoint(session, spec.dataset_id)
        return _next_uncertain(session, spec, ckpt, after, limit) if ckpt else []
    if spec.kind == "disagreements":
        return [(i, i) for i in _next_disagreements(session, spec.dataset_id, after, limit)]
    stmt = select(Image.id).where(Image.dataset_id == spec.dataset_id, Image.id > after)
    if spec.kind == "mine":
        stmt = stmt.where(_not_labeled_by(spec.annotator_id))
    elif spec.kind == "slide":
        stmt = stmt.where(Image.slide_id == spec.slide_id)
    ids = session.scalars(stmt.order_by(Image.id).limit(limit)).all()
    return [(i, i) for i in ids]


def _next_disagreements(session: Session, dataset_id: int, after: int, limit: int) -> list[int]:
    votes = cast(Label.classes, Text)
    stmt = (
        select(Label.image_id)
        .join(Image, Image.id == Label.image_id)
        .where(
            Image.dataset_id == dataset_id,
            Label.image_id > after,
            votes != "[]",
            ~exists().where(Adjudication.image_id == Label.image_id),
        )
        .group_by(Label.image_id)
        .having(and_(func.count() >= 2, func.count(func.distinct(votes)) >= 2))
        .order_by(Label.image_id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def _next_uncertain(
    session: Session, spec: QueueSpec, checkpoint_id: str, after: object, limit: int
) -> list[tuple[tuple[float, int], int]]:
    """Keyset page of the latest prediction per image of ``checkpoint_id``, smallest margin first."""
    newer = Prediction.__table__.alias("newer")
    stmt = (
        select(Prediction.margin, Prediction.image_id)
        .join(Image, Image.id == Prediction.image_id)
        .where(
            Prediction.checkpoint_id == checkpoint_id,
            Prediction.margin.is_not(None),
            Image.dataset_id == spec.dataset_id,
            _not_labeled_by(spec.annotator_id),
            # the image's latest prediction from this checkpoint decides its place
            ~exists().where(newer.c.image_id == Prediction.image_id, newer.c.checkpoint_id == checkpoint_id,
                            newer.c.id > Prediction.id),
        )
        .order_by(Prediction.margin, Prediction.image_id)
        .limit(limit)
    )
    if isinstance(after, (tuple, list)):  # 0 (or any int) = from the start
        m, i = after
        stmt = stmt.where(or_(Prediction.margin > m, and_(Prediction.margin == m, Prediction.image_id > i)))
    return [((float(m), i), i) for m, i in session.execute(stmt)]


def latest_checkpoint(session: Session, dataset_id: int) -> str | None:
    """The checkpoint whose predictions on ``dataset_id`` were written last, if any."""
    in_dataset = Image.dataset_id == dataset_id
    if session.get_bind().dialect.name == "sqlite":
        # SQLite's planner would walk all the dataset's images and sort (35 ms at 100k); "+ 0"
        # keeps it off the dataset index, so it walks predictions newest first and stops at the
        # first one in the dataset (~1 ms). PostgreSQL plans the plain form well.
        in_dataset = Image.dataset_id + 0 == dataset_id
    return session.scalar(
        select(Prediction.checkpoint_id)
        .join(Image, Image.id == Prediction.image_id)
        .where(in_dataset)
        .order_by(Prediction.id.desc())
        .limit(1)
    )


def ranking_checkpoint(session: Session, dataset_id: int) -> str | None:
    """The checkpoint that orders the uncertain queue and makes suggestions: the dataset's active
    model when one is set, else the one whose predictions were stored last."""
    active = session.scalar(select(Dataset.active_checkpoint_id).where(Dataset.id == dataset_id))
    return active or latest_checkpoint(session, dataset_id)


def uncertainty_ranking(session: Session, dataset_id: int, checkpoint_id: str) -> list[int]:
    """Every image id with a prediction from ``checkpoint_id``, most uncertain first (the latest
    prediction per image counts; labeled or not). For reports; the queue pages instead."""
    rows = session.execute(
        select(Prediction.image_id, Prediction.margin)
        .join(Image, Image.id == Prediction.image_id)
        .where(Image.dataset_id == dataset_id, Prediction.checkpoint_id == checkpoint_id)
        .order_by(Prediction.id)
    )
    margin = {image_id: m for image_id, m in rows if m is not None}  # the latest prediction wins
    return sorted(margin, key=lambda i: (margin[i], i))


# --- what the view shows ------------------------------------------------------------------------


def crop_info(session: Session, image_id: int) -> CropInfo | None:
    row = session.execute(
        select(Image, Slide).outerjoin(Slide, Slide.id == Image.slide_id).where(Image.id == image_id)
    ).first()
    if row is None:
        return None
    image, slide = row
    box = None
    if None not in (image.x0, image.y0, image.box_w, image.box_h):
        box = (image.x0, image.y0, image.box_w, image.box_h)
    return CropInfo(
        image_id=image.id,
        path=image.path,
        width=image.width,
        height=image.height,
        slide_id=image.slide_id,
        slide_name=slide.name if slide else None,
        slide_path=slide.path if slide else None,
        stain=(slide.stain.value if slide else None),
        box=box,
    )


def label_of(session: Session, image_id: int, annotator_id: int) -> LabelView | None:
    """``annotator_id``'s current label of the image (and nobody else's: blind labeling)."""
    label = session.scalar(select(Label).where(Label.image_id == image_id, Label.annotator_id == annotator_id))
    if label is None:
        return None
    return LabelView(tuple(label.classes), bool(label.uncertain), label.note or "")


def votes_of(session: Session, image_id: int) -> dict[str, LabelView]:
    """Every annotator's current label of one image (for an adjudicator)."""
    rows = session.execute(
        select(Annotator.name, Label)
        .join(Label, Label.annotator_id == Annotator.id)
        .where(Label.image_id == image_id)
        .order_by(Annotator.name)
    )
    return {name: LabelView(tuple(lab.classes), bool(lab.uncertain), lab.note or "") for name, lab in rows}


def adjudication_of(session: Session, image_id: int) -> tuple[tuple[str, ...], str] | None:
    """(final classes, who decided) for an adjudicated image."""
    row = session.execute(
        select(Adjudication.classes, Annotator.name)
        .join(Annotator, Annotator.id == Adjudication.decided_by_id)
        .where(Adjudication.image_id == image_id)
    ).first()
    return (tuple(row[0]), row[1]) if row else None


def recent_labeled_ids(
    session: Session, dataset_id: int, annotator_id: int, *, exclude: Sequence[int] = (), limit: int = 20
) -> list[int]:
    """Images this annotator labeled last in ``dataset_id``, newest first (for "previous").

    Walks the label history backwards in pages, so it costs the same however long it is.
    """
    seen, out = set(exclude), []
    before = None
    page = 200
    while len(out) < limit:
        stmt = (
            select(LabelEvent.id, LabelEvent.image_id)
            .join(Image, Image.id == LabelEvent.image_id)
            .where(LabelEvent.annotator_id == annotator_id, Image.dataset_id == dataset_id, LabelEvent.action == "set")
            .order_by(LabelEvent.id.desc())
            .limit(page)
        )
        if before is not None:
            stmt = stmt.where(LabelEvent.id < before)
        rows = session.execute(stmt).all()
        for event_id, image_id in rows:
            before = event_id
            if image_id not in seen:
                seen.add(image_id)
                out.append(image_id)
        if len(rows) < page:
            break
    return out[:limit]


def progress(session: Session, dataset_id: int, annotator_id: int) -> Progress:
    """How far this annotator is in the dataset: labeled / total, and their labels per class."""
    total = session.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == dataset_id)) or 0
    rows = session.execute(
        select(cast(Label.classes, Text), Label.uncertain, func.count())
        .join(Image, Image.id == Label.image_id)
        .where(Label.annotator_id == annotator_id, Image.dataset_id == dataset_id)
        .group_by(cast(Label.classes, Text), Label.uncertain)
    )
    per_class: Counter[str] = Counter()
    done = uncertain = 0
    for classes_json, is_uncertain, n in rows:
        done += n
        uncertain += n if is_uncertain else 0
        for key in json.loads(classes_json or "[]"):
            per_class[key] += n
    return Progress(done=done, total=total, per_class=dict(per_class), uncertain=uncertain)


def labels_since(session: Session, annotator_id: int, since: datetime, *, cap: int = 5000) -> int:
    """Labels this annotator wrote in the app since ``since`` (timezone-aware), at most ``cap``.

    Reads the newest ``cap`` events through the (annotator, id) index: bounded cost.
    """
    rows = session.execute(
        select(LabelEvent.at, LabelEvent.source)
        .where(LabelEvent.annotator_id == annotator_id)
        .order_by(LabelEvent.id.desc())
        .limit(cap)
    )
    n = 0
    for at, source in rows:
        if at.tzinfo is None:  # SQLite hands back naive UTC
            at = at.replace(tzinfo=timezone.utc)
        if at < since:
            break
        n += source == "app"
    return n


def slides_of(session: Session, dataset_id: int) -> list[tuple[int, str, int]]:
    """(slide id, name, number of crops) of the slides a dataset's crops come from, by name."""
    rows = session.execute(
        select(Slide.id, Slide.name, func.count(Image.id))
        .join(Image, Image.slide_id == Slide.id)
        .where(Image.dataset_id == dataset_id)
        .group_by(Slide.id, Slide.name)
        .order_by(Slide.name)
    )
    return [(i, n, c) for i, n, c in rows]
