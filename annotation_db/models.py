"""ORM tables of the annotation store (SQLAlchemy 2.0 typed declarative models).

Every table here is created by the Alembic migrations in ``annotation_db/migrations``; the
models and the migrations must agree (``tests/test_db.py`` checks it).

Conventions: class labels are stored as JSON lists of class *keys* (never display names), in
schema order; coordinates are level-0 pixels; times are timezone-aware UTC.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names so Alembic migrations work the same on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Stain(str, enum.Enum):
    HE = "HE"
    PAS = "PAS"
    OTHER = "other"


class Dataset(Base):
    """A set of images sharing one ordered class schema."""

    __tablename__ = "dataset"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    multi_label: Mapped[bool] = mapped_column(Boolean, default=False)
    # Absolute folder the images' relative paths resolve against (may be re-pointed later).
    root: Mapped[str] = mapped_column(Text, default="")
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The model the viewer opens first and suggestions come from (migration 0007): the checkpoint
    # file, and the id its Prediction rows carry.
    active_checkpoint: Mapped[str | None] = mapped_column(Text)
    active_checkpoint_id: Mapped[str | None] = mapped_column(String(200))
    # Suggestions while labeling: "off", "after" (the clinician's own first label) or "before".
    suggestions: Mapped[str] = mapped_column(String(16), default="off", server_default="off")
    # The blind slice, a fixed share of images that never shows a suggestion (annotation_db.suggestions).
    blind_share: Mapped[float] = mapped_column(Float, default=0.1, server_default="0.1")
    blind_seed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    classes: Mapped[list[ClassDef]] = relationship(
        back_populates="dataset", order_by="ClassDef.position", cascade="all, delete-orphan"
    )

    @property
    def class_keys(self) -> list[str]:
        return [c.key for c in self.classes]


class ClassDef(Base):
    """One class of a dataset's schema: a stable key, what people read, and its hotkey."""

    __tablename__ = "class_def"
    __table_args__ = (
        UniqueConstraint("dataset_id", "key", name="uq_class_def_dataset_key"),
        UniqueConstraint("dataset_id", "position", name="uq_class_def_dataset_position"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(200))
    display_name: Mapped[str] = mapped_column(String(200))
    hotkey: Mapped[str | None] = mapped_column(String(8))

    dataset: Mapped[Dataset] = relationship(back_populates="classes")


class Slide(Base):
    """A whole-slide image (or just its name when only crops are known)."""

    __tablename__ = "slide"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    path: Mapped[str | None] = mapped_column(Text)
    stain: Mapped[Stain] = mapped_column(
        Enum(Stain, name="stain", native_enum=False, values_callable=lambda e: [m.value for m in e]),
        default=Stain.OTHER,
    )
    mpp: Mapped[float | None] = mapped_column(Float)  # µm per level-0 pixel
    # who the biopsy came from: training splits can keep a patient's slides together
    patient: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Image(Base):
    """One crop, addressed by its path relative to the dataset's root."""

    __tablename__ = "image"
    __table_args__ = (
        UniqueConstraint("dataset_id", "path", name="uq_image_dataset_path"),
        Index("ix_image_dataset_sha256", "dataset_id", "sha256"),
        Index("ix_image_slide", "slide_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    slide_id: Mapped[int | None] = mapped_column(ForeignKey("slide.id", ondelete="SET NULL"))
    # Level-0 box on the slide: x, y of the top-left corner, then width and height.
    x0: Mapped[int | None] = mapped_column(Integer)
    y0: Mapped[int | None] = mapped_column(Integer)
    box_w: Mapped[int | None] = mapped_column(Integer)
    box_h: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    dataset: Mapped[Dataset] = relationship()
    slide: Mapped[Slide | None] = relationship()


class Annotator(Base):
    """A person (or a model, ``model:<checkpoint>``) labels are attributed to; a person with a
    ``password_hash`` (argon2id) can sign in, with the rights of ``role`` (annotation_db.users)."""

    __tablename__ = "annotator"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="annotator", server_default="annotator")
    password_hash: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Label(Base):
    """The current label of one image by one annotator (its past lives in ``label_event``)."""

    __tablename__ = "label"
    __table_args__ = (
        UniqueConstraint("image_id", "annotator_id", name="uq_label_image_annotator"),
        Index("ix_label_annotator", "annotator_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id", ondelete="CASCADE"))
    classes: Mapped[list[str]] = mapped_column(JSON)
    uncertain: Mapped[bool] = mapped_column(Boolean, default=False)
    note: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The model's class shown when this label was given (NULL: no suggestion shown), and by which checkpoint.
    suggested: Mapped[str | None] = mapped_column(String(200))
    suggested_by: Mapped[str | None] = mapped_column(String(200))

    image: Mapped[Image] = relationship()
    annotator: Mapped[Annotator] = relationship()


class LabelEvent(Base):
    """Append-only history: one row per label change, never updated or deleted."""

    __tablename__ = "label_event"
    __table_args__ = (Index("ix_label_event_image", "image_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(16))  # "set" | "clear" | "adjudicate" (an adjudicator's final label)
    classes: Mapped[list[str]] = mapped_column(JSON)
    uncertain: Mapped[bool] = mapped_column(Boolean, default=False)
    note: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(64), default="")  # "app", "import:jsonl", ...
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    suggested: Mapped[str | None] = mapped_column(String(200))
    suggested_by: Mapped[str | None] = mapped_column(String(200))


class Adjudication(Base):
    """The final label of an image, and who decided it."""

    __tablename__ = "adjudication"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), unique=True)
    decided_by_id: Mapped[int] = mapped_column(ForeignKey("annotator.id"))
    classes: Mapped[list[str]] = mapped_column(JSON)
    note: Mapped[str] = mapped_column(Text, default="")
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    image: Mapped[Image] = relationship()
    decided_by: Mapped[Annotator] = relationship()


class Prediction(Base):
    """A model's class probabilities for an image (viewer, model-assisted queues)."""

    __tablename__ = "prediction"
    __table_args__ = (
        Index("ix_prediction_image_checkpoint", "image_id", "checkpoint_id"),
        # the model-uncertain queue pages through (margin, image_id) of one checkpoint
        Index("ix_prediction_checkpoint_margin", "checkpoint_id", "margin", "image_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"))
    checkpoint_id: Mapped[str] = mapped_column(String(200))
    probs: Mapped[dict[str, float]] = mapped_column(JSON)  # class key -> probability
    predicted: Mapped[str] = mapped_column(String(200))
    # top-1 minus top-2 probability (small = the model is unsure); NULL only for rows written
    # before migration 0004 could compute it
    margin: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SlideBox(Base):
    """A glomerulus marked on a slide (level-0 pixels): a box, and its outline (``polygon``, an open
    ring whose bounds are the box) when it was drawn as one, imported from an annotation file or
    accepted from a detector proposal. ``source``: ``drawn``, ``proposal`` or ``import:<file>``;
    ``image_id`` once it is cropped (:mod:`annotation_db.boxes`)."""

    __tablename__ = "slide_box"
    __table_args__ = (Index("ix_slide_box_slide", "slide_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slide.id", ondelete="CASCADE"))
    x0: Mapped[int] = mapped_column(Integer)
    y0: Mapped[int] = mapped_column(Integer)
    box_w: Mapped[int] = mapped_column(Integer)
    box_h: Mapped[int] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(String(200))  # class key, or None when unlabelled
    created_by: Mapped[str] = mapped_column(String(200))  # annotator name
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("image.id", ondelete="SET NULL"))
    polygon: Mapped[list[list[float]] | None] = mapped_column(JSON(none_as_null=True))  # level-0 [[x, y], ...], open
    source: Mapped[str] = mapped_column(String(300), default="drawn", server_default="drawn")

    slide: Mapped[Slide] = relationship()
    image: Mapped[Image | None] = relationship()

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.box_w, self.box_h)


JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")


class Job(Base):
    """A training job (Models page, ``glom jobs``): train a recipe on a dataset's labels, then
    predict the whole dataset. Run by ``core.jobs`` in a process of its own; ``pid`` and ``host``
    say where, so a job whose process is gone is found out (annotation_db.jobs)."""

    __tablename__ = "job"
    __table_args__ = (Index("ix_job_status_id", "status", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    recipe: Mapped[str] = mapped_column(Text)
    overrides: Mapped[list[str]] = mapped_column(JSON, default=list)  # "key=value" recipe overrides
    label_source: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")  # JOB_STATUSES
    stage: Mapped[str] = mapped_column(String(32), default="", server_default="")  # training | predicting
    device: Mapped[str] = mapped_column(String(32), default="", server_default="")
    host: Mapped[str] = mapped_column(String(200), default="", server_default="")
    pid: Mapped[int | None] = mapped_column(Integer)
    runs_dir: Mapped[str] = mapped_column(Text)  # the job's folders live under <runs_dir>/jobs
    log_path: Mapped[str] = mapped_column(Text, default="", server_default="")
    run_dir: Mapped[str] = mapped_column(Text, default="", server_default="")
    checkpoint: Mapped[str] = mapped_column(Text, default="", server_default="")
    checkpoint_id: Mapped[str] = mapped_column(String(200), default="", server_default="")
    error: Mapped[str] = mapped_column(Text, default="", server_default="")  # the one `error:` line
    metrics: Mapped[dict | None] = mapped_column(JSON)  # validation / test figures of the best epoch
    data_summary: Mapped[dict | None] = mapped_column(JSON)  # what the model saw: images per split and class
    predictions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())

    dataset: Mapped[Dataset] = relationship()


# Labeling-app queues (migration 0003): keyset pages of a dataset's images in id order, and an
# annotator's most recent label events (the "previous" button after a reload).
Index("ix_image_dataset_id", Image.dataset_id, Image.id)
Index("ix_label_event_annotator_id", LabelEvent.annotator_id, LabelEvent.id)


class ImportBatch(Base):
    """An import in flight (annotation_db.staging). Its rows wait in ``import_staged_image`` and
    ``import_staged_label``, which no reader looks at, until one short transaction publishes them;
    ``owner_host``, ``owner_pid`` and ``heartbeat_at`` tell a running import from one whose
    process died, whose leftovers the next import deletes."""

    __tablename__ = "import_batch"

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset: Mapped[str] = mapped_column(String(200))  # the target's name (it may not exist yet)
    source: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="staging")  # staging | published | discarding
    owner_host: Mapped[str] = mapped_column(String(200))
    owner_pid: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ImportStagedImage(Base):
    """An image an import will register (a path not in the store when the import checked it)."""

    __tablename__ = "import_staged_image"

    batch_id: Mapped[int] = mapped_column(ForeignKey("import_batch.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)  # order in the file
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    slide: Mapped[str | None] = mapped_column(String(300))  # slide name


class ImportStagedLabel(Base):
    """A label an import will set: (image path, annotator name) -> classes."""

    __tablename__ = "import_staged_label"

    batch_id: Mapped[int] = mapped_column(ForeignKey("import_batch.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    annotator: Mapped[str] = mapped_column(String(200))
    classes: Mapped[list[str]] = mapped_column(JSON)
    uncertain: Mapped[bool] = mapped_column(Boolean, default=False)


PROPOSAL_STATUSES = ("proposed", "accepted", "rejected")


class GlomerulusProposal(Base):
    """A glomerulus a detector found on a slide (``glom detect --dataset``), for a clinician to
    accept or reject. Level-0 polygon and box; ``source`` is ``model:<checkpoint>``. Accepting one
    draws a ``SlideBox`` (``slide_box_id``), which is cropped like any drawn box."""

    __tablename__ = "glomerulus_proposal"
    __table_args__ = (Index("ix_glomerulus_proposal_slide_dataset_status", "slide_id", "dataset_id", "status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slide.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="proposed")  # PROPOSAL_STATUSES
    source: Mapped[str] = mapped_column(String(300))  # model:<checkpoint name>
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), default="")
    score: Mapped[float] = mapped_column(Float)
    polygon: Mapped[list[list[float]]] = mapped_column(JSON)  # level-0 [[x, y], ...]
    x0: Mapped[int] = mapped_column(Integer)
    y0: Mapped[int] = mapped_column(Integer)
    box_w: Mapped[int] = mapped_column(Integer)
    box_h: Mapped[int] = mapped_column(Integer)
    area_um2: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    reviewed_by: Mapped[str | None] = mapped_column(String(200))
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    slide_box_id: Mapped[int | None] = mapped_column(ForeignKey("slide_box.id", ondelete="SET NULL"))

    slide: Mapped[Slide] = relationship()
    slide_box: Mapped[SlideBox | None] = relationship()

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.box_w, self.box_h)
