"""Import batches: rows nobody sees until one short transaction publishes them.

An import (annotation_db.importer) writes its rows in short transactions into
``import_staged_image`` and ``import_staged_label``, tables no query of the app, the exports or
agreement reads; then one transaction of set-based ``INSERT … SELECT`` statements moves them into
``image``, ``label`` and ``label_event``. On SQLite, whose one writer at a time is the reason for
all this, a click in the labeling app then waits for one staged chunk or for the publish, never
for the whole import; and an import that fails (or is killed) before its publish commits has
changed nothing anyone sees. Its staged rows are deleted by the import itself on an error, or by
the next import when its process died (:func:`clean_abandoned`).

    batch = open_batch(session, "kidney", "import:csv")        # its own short transaction
    stage_rows(session, batch, images, labels)                  # one short transaction per chunk
    claim_for_publish(session, batch)                           # the publish: one short transaction
    counts = publish_rows(session, batch, dataset_id, source="import:csv", skip_duplicates=False)
    delete_staged(Session, batch)                               # staged rows, then the batch row
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import (
    DateTime,
    Integer,
    String,
    Text,
    and_,
    cast,
    delete,
    exists,
    func,
    literal,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from annotation_db.db import StoreError
from annotation_db.models import (
    Annotator,
    Image,
    ImportBatch,
    ImportStagedImage,
    ImportStagedLabel,
    Label,
    LabelEvent,
    Slide,
    utcnow,
)

log = logging.getLogger(__name__)

# Rows per staging transaction (images and labels each): on SQLite a click waits at most this long.
STAGE_CHUNK = 1000
# A batch whose heartbeat is older than this is taken for abandoned even when its owner's process
# cannot be checked (another host); GLOM_IMPORT_STALE_S changes it.
STALE_AFTER_S = 3600
# Publishes take this transaction-level lock on PostgreSQL: two imports' publishes run one after
# the other, as they do on SQLite, so neither sees half of the other's new images or dataset.
_PG_PUBLISH_LOCK = 0x676C6F6D  # "glom"
_SQLITE_PUBLISH_CACHE_KIB = 128 * 1024
# Pause between an import's transactions on SQLite. SQLite has no queue for its write lock: a click
# that found it taken sleeps in its busy handler (1, 2, 5, 10, 15, 20, 25 ms, ...) and an import
# that began its next transaction at once would win again and again (clicks waited 0.8-0.9 s
# behind back-to-back chunks in the bench). 30 ms lets a waiting click in; 100 chunks cost 3 s.
_SQLITE_YIELD_S = 0.03
# INSERT … SELECT reports how many rows it wrote only when asked to (SQLAlchemy 2.0.28+).
_ROWCOUNT = {"preserve_rowcount": True}


class ImportBatchLostError(StoreError):
    """The batch's staged rows were taken for abandoned and deleted while its import still ran."""


@dataclass
class PublishCounts:
    images_added: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (staged path, registered twin)
    labels_written: int = 0


def _owner() -> tuple[str, int]:
    return socket.gethostname()[:200], os.getpid()


def open_batch(session: Session, dataset: str, source: str) -> int:
    """A new batch for an import into ``dataset``, owned by this process; its id."""
    host, pid = _owner()
    batch = ImportBatch(dataset=dataset[:200], source=source[:64], status="staging", owner_host=host, owner_pid=pid)
    session.add(batch)
    session.flush()
    return batch.id


def stage_rows(session: Session, batch_id: int, images: Sequence[dict], labels: Sequence[dict]) -> None:
    """Add one chunk of staged rows and renew the batch's heartbeat.

    ``images``: dicts of seq, path, sha256, width, height, slide (name or None); ``labels``: seq,
    path, annotator (name), classes (keys), uncertain. Raises :class:`ImportBatchLostError` when
    the batch is gone (another import took it for abandoned).
    """
    alive = session.execute(
        update(ImportBatch).where(ImportBatch.id == batch_id, ImportBatch.status == "staging")
        .values(heartbeat_at=utcnow())
    ).rowcount
    if alive != 1:
        raise ImportBatchLostError(_lost(batch_id))
    if images:
        session.execute(ImportStagedImage.__table__.insert(), [dict(r, batch_id=batch_id) for r in images])
    if labels:
        session.execute(ImportStagedLabel.__table__.insert(), [dict(r, batch_id=batch_id) for r in labels])


def _lost(batch_id: int) -> str:
    return (f"import batch {batch_id} was deleted while it ran (another import took its process for dead: "
            f"is its heartbeat older than GLOM_IMPORT_STALE_S?); nothing was imported: run the import again")


def _dialect_insert(session: Session):
    name = session.get_bind().dialect.name
    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(name)
    if insert is None:
        raise StoreError(f"Imports are implemented for SQLite and PostgreSQL, not {name}.")
    return insert


def _json_value(column, dialect: str):
    """A JSON column as something ``=`` compares: jsonb on PostgreSQL (json has no equality), the
    stored text on SQLite (both sides are written by the same serializer)."""
    return cast(column, postgresql.JSONB) if dialect == "postgresql" else cast(column, Text)


def claim_for_publish(session: Session, batch_id: int) -> None:
    """Start a publish in the caller's transaction, before it creates what the rows need: wait for
    any other publish to commit (PostgreSQL; SQLite has one writer anyway) and mark the batch
    published, so that no cleaner deletes it. Raises :class:`ImportBatchLostError` when it is gone."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_PUBLISH_LOCK})
    claimed = session.execute(
        update(ImportBatch).where(ImportBatch.id == batch_id, ImportBatch.status == "staging")
        .values(status="published", heartbeat_at=utcnow())
    ).rowcount
    if claimed != 1:
        raise ImportBatchLostError(_lost(batch_id))


def publish_rows(session: Session, batch_id: int, dataset_id: int, *, source: str,
                 skip_duplicates: bool) -> PublishCounts:
    """Move the batch's staged rows into ``image``, ``label`` and ``label_event`` (set-based, in
    the caller's transaction, which should hold nothing else that is slow).

    Staged images whose path is registered by now count as existing; images whose bytes the
    dataset already holds under another path are reported as duplicates (and left out with
    ``skip_duplicates``, with their labels). A label equal to the annotator's current one writes
    nothing; every other one replaces it and appends to the history. Slides and annotators the
    staged rows name must exist; :func:`claim_for_publish` must have run in this transaction.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        # The new rows' index entries land all over the indexes (paths, hashes): with SQLite's
        # default 2 MiB page cache most of them would be a read from disk.
        cache_size = session.execute(text("PRAGMA cache_size")).scalar()
        session.execute(text(f"PRAGMA cache_size = -{_SQLITE_PUBLISH_CACHE_KIB}"))
    if dialect == "postgresql":
        # Fresh statistics, or the planner takes the just-filled staging tables for empty ones.
        session.execute(text("ANALYZE import_staged_image, import_staged_label"))
    insert = _dialect_insert(session)
    now = utcnow()
    at = literal(now, DateTime(timezone=True))
    staged, img = ImportStagedImage.__table__, Image.__table__
    counts = PublishCounts()

    registered = exists().where(img.c.dataset_id == dataset_id, img.c.path == staged.c.path)
    twin = img.alias("twin")
    pairs = session.execute(
        select(staged.c.path, func.min(twin.c.path))
        .join(twin, and_(twin.c.dataset_id == dataset_id, twin.c.sha256 == staged.c.sha256, twin.c.path != staged.c.path))
        .where(staged.c.batch_id == batch_id, ~registered)
        .group_by(staged.c.seq, staged.c.path)
        .order_by(staged.c.seq)
    ).all()
    counts.duplicates = [(p, t) for p, t in pairs]

    rows = (
        select(literal(dataset_id, Integer), staged.c.path, staged.c.sha256, staged.c.width, staged.c.height,
               Slide.__table__.c.id, at)
        .select_from(staged.outerjoin(Slide.__table__, Slide.__table__.c.name == staged.c.slide))
        .where(staged.c.batch_id == batch_id)
        .order_by(staged.c.seq)  # image ids follow the file's order, as the queues show them
    )
    if skip_duplicates:
        rows = rows.where(~exists().where(img.c.dataset_id == dataset_id, img.c.sha256 == staged.c.sha256))
    counts.images_added = session.execute(
        insert(img)
        .from_select(["dataset_id", "path", "sha256", "width", "height", "slide_id", "created_at"], rows)
        .on_conflict_do_nothing(index_elements=["dataset_id", "path"]),
        execution_options=_ROWCOUNT,
    ).rowcount

    if dialect == "postgresql" and counts.images_added > 1000:
        session.execute(text("ANALYZE image"))  # as above: the labels are matched to the new images
    sl, lab, ann = ImportStagedLabel.__table__, Label.__table__, Annotator.__table__
    cur = lab.alias("cur")
    unchanged = and_(_json_value(cur.c.classes, dialect) == _json_value(sl.c.classes, dialect),
                     cur.c.uncertain == sl.c.uncertain)

    def changed(*columns):
        return (
            select(img.c.id, ann.c.id, *columns)
            .select_from(
                sl.join(img, and_(img.c.dataset_id == dataset_id, img.c.path == sl.c.path))
                .join(ann, ann.c.name == sl.c.annotator)
                .outerjoin(cur, and_(cur.c.image_id == img.c.id, cur.c.annotator_id == ann.c.id))
            )
            .where(sl.c.batch_id == batch_id, or_(cur.c.id.is_(None), not_(unchanged)))
        )

    # History first, while ``label`` still holds the labels being replaced.
    counts.labels_written = session.execute(
        LabelEvent.__table__.insert().from_select(
            ["image_id", "annotator_id", "action", "classes", "uncertain", "note", "source", "at"],
            changed(literal("set", String), sl.c.classes, sl.c.uncertain, literal("", Text),
                    literal(source, String), at).order_by(sl.c.seq),
        ),
        execution_options=_ROWCOUNT,
    ).rowcount
    upsert = insert(lab).from_select(
        ["image_id", "annotator_id", "classes", "uncertain", "note", "updated_at"],
        changed(sl.c.classes, sl.c.uncertain, literal("", Text), at),
    )
    # An imported label carries nothing else of the one it replaces (note, the suggestion shown, ...).
    reset = {c.name: None for c in lab.c
             if c.nullable and c.name not in ("id", "image_id", "annotator_id", "classes", "uncertain", "updated_at")}
    upsert = upsert.on_conflict_do_update(
        index_elements=["image_id", "annotator_id"],
        set_={"classes": upsert.excluded.classes, "uncertain": upsert.excluded.uncertain,
              "note": upsert.excluded.note, "updated_at": upsert.excluded.updated_at, **reset},
    )
    session.execute(upsert)
    if dialect == "sqlite":  # the pooled connection lives on: give the memory back
        session.execute(text(f"PRAGMA cache_size = {int(cache_size)}"))
    return counts


def delete_staged(session_factory: sessionmaker[Session] | None, batch_id: int, *, session: Session | None = None,
                  chunk: int = 5 * STAGE_CHUNK) -> None:
    """Delete a batch's staged rows and then the batch row: in the caller's ``session`` when given,
    else in short transactions of ``chunk`` rows of ``session_factory`` (a click never waits long)."""
    tables = (ImportStagedImage.__table__, ImportStagedLabel.__table__)
    if session is not None:
        for t in tables:
            session.execute(delete(t).where(t.c.batch_id == batch_id))
        session.execute(delete(ImportBatch).where(ImportBatch.id == batch_id))
        return
    for t in tables:
        start = 0
        while True:
            with session_factory() as s, s.begin():
                top = s.scalar(select(func.max(t.c.seq)).where(t.c.batch_id == batch_id))
                if top is None:
                    break
                s.execute(delete(t).where(t.c.batch_id == batch_id, t.c.seq < start + chunk))
            start += chunk
            yield_to_writers(session_factory)
    with session_factory() as s, s.begin():
        s.execute(delete(ImportBatch).where(ImportBatch.id == batch_id))


def yield_to_writers(session_factory: sessionmaker[Session]) -> None:
    """Between two of an import's transactions on SQLite: let a click waiting for the lock have it."""
    bind = session_factory.kw.get("bind")
    if bind is not None and bind.dialect.name == "sqlite":
        time.sleep(_SQLITE_YIELD_S)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)  # SQLite gives back naive UTC


def _stale_after_s() -> float:
    raw = os.environ.get("GLOM_IMPORT_STALE_S", "").strip()
    try:
        return float(raw) if raw else STALE_AFTER_S
    except ValueError:
        raise StoreError(f"GLOM_IMPORT_STALE_S={raw!r} is not a number of seconds") from None


def is_abandoned(batch: ImportBatch, *, now: datetime | None = None) -> bool:
    """True when no process works on ``batch`` any more: its owner ran on this host and is gone,
    or its heartbeat is older than GLOM_IMPORT_STALE_S (default one hour)."""
    host, pid = _owner()
    if batch.owner_host == host and batch.owner_pid != pid and not _pid_alive(batch.owner_pid):
        return True
    age = ((now or utcnow()) - _aware(batch.heartbeat_at)).total_seconds()
    return age > _stale_after_s()


def clean_abandoned(session_factory: sessionmaker[Session]) -> int:
    """Delete the staged rows of imports whose process died (killed, crashed, machine restarted);
    the number of batches cleaned. Readers never saw those rows; a batch that died after its
    publish committed only leaves staged copies of rows already published."""
    with session_factory() as s, s.begin():
        batches = list(s.scalars(select(ImportBatch)))
    host, pid = _owner()
    cleaned = 0
    for b in batches:
        if not is_abandoned(b):
            continue
        with session_factory() as s, s.begin():  # claim it, so that two cleaners do not both work on it
            claimed = s.execute(
                update(ImportBatch)
                .where(ImportBatch.id == b.id, ImportBatch.owner_host == b.owner_host, ImportBatch.owner_pid == b.owner_pid)
                .values(status="discarding", owner_host=host, owner_pid=pid, heartbeat_at=utcnow())
            ).rowcount
        if claimed != 1:
            continue
        log.warning("deleting the staged rows of import batch %d into %r (%s, process %d on %s is gone)",
                    b.id, b.dataset, b.status, b.owner_pid, b.owner_host)
        delete_staged(session_factory, b.id)
        cleaned += 1
    return cleaned
