"""Write what a label file holds into the store, in batches whose cost does not grow with the
store: every lookup is an indexed ``IN`` query over a batch, every write one set-based statement.

Every record is checked (paths, classes, files, repeated lines) before the first write, then the
rows go through staging tables (annotation_db.staging) and are published together: an error
anywhere stores nothing of the file. :func:`import_records` does it all in the caller's
transaction; :func:`import_staged` (``glom import``, the Import page) in short transactions, so
that a large import never makes a click in the labeling app wait for all of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tqdm.auto import tqdm

from annotation_db import formats, staging
from annotation_db.classes import ClassKeys, ClassSpec, InvalidLabelError, schema_for
from annotation_db.db import StoreError
from annotation_db.formats import FormatError, Record
from annotation_db.images import (
    ImageFileError,
    ImageLimits,
    ImageMeta,
    normalize_rel_path,
    read_image_meta,
    resolve_in_root,
)
from annotation_db.models import Dataset, Image, Slide, Stain, utcnow
from annotation_db.paths import is_within
from annotation_db.store import (
    DatasetNotFoundError,
    create_dataset,
    get_dataset,
    get_or_create_annotator,
    get_or_create_dataset,
    get_or_create_slide,
    new_dataset,
)

log = logging.getLogger(__name__)

BATCH_SIZE = 2000


@dataclass
class ImportReport:
    dataset: str
    records: int = 0
    images_added: int = 0
    images_existing: int = 0
    labels_written: int = 0
    labels_unchanged: int = 0
    missing: list[str] = field(default_factory=list)  # "where: path" of files skipped as missing
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, path of the same bytes)
    duplicates_skipped: int = 0
    overridden: list[str] = field(default_factory=list)  # "where" of lines a later line replaced (keep_last)

    def summary(self) -> str:
        parts = [
            f"{self.records} records",
            f"{self.images_added} images added",
            f"{self.images_existing} already registered",
            f"{self.labels_written} labels written",
        ]
        if self.labels_unchanged:
            parts.append(f"{self.labels_unchanged} unchanged")
        if self.missing:
            parts.append(f"{len(self.missing)} missing files skipped")
        if self.overridden:
            parts.append(f"{len(self.overridden)} earlier lines for the same image replaced by later ones")
        if self.duplicates:
            verb = "skipped" if self.duplicates_skipped else "kept"
            parts.append(f"{len(self.duplicates)} duplicate images by hash ({verb})")
        return f"{self.dataset}: " + ", ".join(parts)


def class_names_of(records: Iterable[Record]) -> list[str]:
    """Distinct class names used by records, sorted (for folder, CSV and Label Studio files)."""
    return sorted({c for r in records for c in (r.classes or [])})


def ensure_dataset(
    session: Session,
    name: str,
    *,
    class_names: Sequence[str],
    root: str | Path,
    multi_label: bool = False,
) -> Dataset:
    """The dataset ``name``; created from the file's ``class_names`` (:func:`schema_for`) and
    ``root`` when it does not exist."""
    return get_or_create_dataset(session, name, schema_for(class_names), root=root, multi_label=multi_label)


def _keys_for(record: Record, dataset: Dataset, class_keys: ClassKeys) -> list[str]:
    keys = [class_keys.key(name, where=f"{record.where}: field 'label'") for name in record.classes or []]
    if len(set(keys)) > 1 and not dataset.multi_label:
        raise InvalidLabelError(
            f"{record.where}: field 'label': {len(keys)} classes {keys} for single-label dataset {dataset.name!r}"
        )
    order = dataset.class_keys
    return sorted(set(keys), key=order.index)


@dataclass
class ImportPlan:
    """What an import will write, found by checking every record against its files and the store
    before the first write: the rows to stage, and what the publish creates first."""

    dataset: Dataset  # the target; not in the store yet (``id`` None) when the import creates it
    report: ImportReport
    images: list[dict] = field(default_factory=list)  # staged image rows (paths the store lacked), file order
    labels: list[dict] = field(default_factory=list)  # staged label rows, one per (image, annotator)
    slides: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # name -> (patient, where)
    annotators: list[str] = field(default_factory=list)


def plan_import(
    dataset: Dataset,
    records: Sequence[Record],
    *,
    registered: Callable[[list[str]], set[str]],
    annotator: str,
    skip_missing: bool = False,
    skip_duplicates: bool = False,
    confine_to: Path | None = None,
    keep_last: bool = False,
    metas: dict[str, ImageMeta] | None = None,
    progress: bool = False,
) -> ImportPlan:
    """Check every record and work out the rows to write; writes nothing.

    ``registered(paths)``: which of these relative paths the dataset already holds (asked in
    batches of :data:`BATCH_SIZE`). Images the store lacks are read here unless ``metas`` has
    them. Raises as :func:`import_records` does, naming file, line and field.
    """
    report = ImportReport(dataset=dataset.name, records=len(records))
    limits = ImageLimits.from_env()
    plan = ImportPlan(dataset=dataset, report=report)
    patients = _slide_patients(records)
    class_keys = ClassKeys.of(dataset)
    rels: list[str] = []
    for r in records:
        try:
            rels.append(normalize_rel_path(dataset, r.image))
        except (ImageFileError, OSError, ValueError) as e:
            raise ImageFileError(f"{r.where}: field 'image': {e}") from None
    keys = [_keys_for(r, dataset, class_keys) for r in records]
    report.overridden = _repeated_images(records, rels, keys, annotator, keep_last)
    distinct = list(dict.fromkeys(rels))
    known: set[str] = set()
    for start in range(0, len(distinct), BATCH_SIZE):
        known |= registered(distinct[start : start + BATCH_SIZE])

    new: dict[str, dict] = {}
    skipped: set[str] = set()
    first_by_hash: dict[str, str] = {}
    for r, rel in tqdm(list(zip(records, rels)), desc=f"import {dataset.name}", unit="img", disable=not progress):
        if rel in known or rel in new or rel in skipped:
            continue
        path = resolve_in_root(dataset, rel)
        if confine_to is not None and not is_within(path, confine_to):
            raise ImageFileError(f"{r.where}: field 'image': refused: not a file under the data folder")
        try:
            is_file = path.is_file()
        except OSError as e:  # e.g. a name longer than the file system allows
            raise ImageFileError(f"{r.where}: field 'image': cannot use this path ({e.strerror})") from None
        if not is_file:
            if skip_missing:
                report.missing.append(f"{r.where}: {rel}")
                skipped.add(rel)
                continue
            raise ImageFileError(
                f"{r.where}: field 'image': {rel} not found under the data root {dataset.root} "
                "(pass --skip-missing to import the rest and list what is missing)"
            )
        meta = (metas or {}).get(str(path))
        if meta is None:
            try:
                meta = read_image_meta(path, limits)
            except ImageFileError as e:
                raise type(e)(f"{r.where}: field 'image': {e}") from None
        twin = first_by_hash.setdefault(meta.sha256, rel)
        if twin != rel:  # the same bytes twice in this file (the store's twins are found when publishing)
            report.duplicates.append((rel, twin))
            if skip_duplicates:
                report.duplicates_skipped += 1
                skipped.add(rel)
                continue
        new[rel] = dict(seq=len(new), path=rel, sha256=meta.sha256, width=meta.width, height=meta.height,
                        slide=r.slide or None)
        if r.slide:
            plan.slides.setdefault(r.slide, (patients.get(r.slide, (None, r.where))[0], r.where))
    for slide, (patient, where) in patients.items():
        plan.slides.setdefault(slide, (patient, where))
    plan.images = list(new.values())
    report.images_existing = len({rel for rel in rels if rel in known})

    # Labels: one per (image, annotator), the last line winning (conflicts were refused above).
    wanted: dict[tuple[str, str], dict] = {}
    for r, rel, k in zip(records, rels, keys):
        if rel in skipped or not k:
            continue
        who = (r.annotator or annotator).strip()
        if not who:
            raise InvalidLabelError(f"{r.where}: field 'annotator': an annotator needs a non-empty name")
        wanted.pop((rel, who), None)
        wanted[(rel, who)] = dict(path=rel, annotator=who, classes=k, uncertain=bool(r.uncertain))
    plan.labels = [dict(row, seq=i) for i, row in enumerate(wanted.values())]
    plan.annotators = sorted({who for _, who in wanted})
    return plan


def _stage_chunks(plan: ImportPlan, chunk: int):
    n = max(len(plan.images), len(plan.labels))
    for start in range(0, n, chunk):
        yield plan.images[start : start + chunk], plan.labels[start : start + chunk]


def _publish(session: Session, plan: ImportPlan, batch_id: int, *, source: str, stain: str | None,
             skip_duplicates: bool, schema: Sequence[ClassSpec] = ()) -> ImportReport:
    """Create what the rows need (the dataset when new, slides, annotators), then publish them."""
    staging.claim_for_publish(session, batch_id)
    dataset = _publish_dataset(session, plan.dataset, schema)
    _publish_slides(session, plan.slides, stain)
    for name in plan.annotators:
        get_or_create_annotator(session, name)
    counts = staging.publish_rows(session, batch_id, dataset.id, source=source, skip_duplicates=skip_duplicates)
    report = plan.report
    report.images_added = counts.images_added
    report.duplicates.extend(counts.duplicates)
    skipped = {p for p, _ in counts.duplicates} if skip_duplicates else set()
    report.duplicates_skipped += len(skipped)
    report.images_existing += len(plan.images) - counts.images_added - len(skipped)
    report.labels_written = counts.labels_written
    report.labels_unchanged = sum(1 for row in plan.labels if row["path"] not in skipped) - counts.labels_written
    return report


def _publish_dataset(session: Session, planned: Dataset, schema: Sequence[ClassSpec]) -> Dataset:
    """The dataset the plan was checked against: as it was, or created now when the plan found
    none. Refuses one created meanwhile (by another import) with other classes or another root."""
    if planned.id is not None:
        dataset = session.get(Dataset, planned.id)
        if dataset is None or dataset.name != planned.name:
            raise StoreError(f"dataset {planned.name!r} was deleted or renamed while this import ran; nothing "
                             "was imported")
        return dataset
    try:
        dataset = get_dataset(session, planned.name)
    except DatasetNotFoundError:
        return create_dataset(session, planned.name, schema, multi_label=planned.multi_label, root=planned.root)
    if (dataset.class_keys, dataset.root, dataset.multi_label) != (planned.class_keys, planned.root, planned.multi_label):
        raise StoreError(
            f"dataset {planned.name!r} was created by someone else while this import ran, with classes "
            f"{dataset.class_keys} and root {dataset.root} (this import: {planned.class_keys}, {planned.root}); "
            "nothing was imported: run the import again to check the file against it")
    return dataset


def _publish_slides(session: Session, slides: dict[str, tuple[str | None, str]], stain: str | None) -> None:
    """Register the slides the new images name (with their stain) and record patients: one
    statement for the slides the store lacks, the ORM for the few that change."""
    names = list(slides)
    known: dict[str, Slide] = {}
    for start in range(0, len(names), BATCH_SIZE):
        known.update({s.name: s for s in session.scalars(select(Slide).where(Slide.name.in_(names[start : start + BATCH_SIZE])))})
    now = utcnow()
    missing = [dict(name=n, path=None, stain=Stain(stain) if stain else Stain.OTHER, mpp=None, patient=p or None,
                    created_at=now) for n, (p, _) in slides.items() if n not in known]
    if missing:
        session.execute(Slide.__table__.insert(), missing)
    for name, slide in known.items():
        patient, where = slides[name]
        if (patient and slide.patient != patient) or (stain and slide.stain == Stain.OTHER):
            try:
                get_or_create_slide(session, name, stain=stain, patient=patient)
            except InvalidLabelError as e:
                raise InvalidLabelError(f"{where}: field 'patient': {e}") from None


def import_records(
    session: Session,
    dataset: Dataset,
    records: Sequence[Record],
    *,
    annotator: str,
    source: str,
    skip_missing: bool = False,
    skip_duplicates: bool = False,
    stain: str | None = None,
    progress: bool = False,
    confine_to: Path | None = None,
    keep_last: bool = False,
    metas: dict[str, ImageMeta] | None = None,
) -> ImportReport:
    """Register every record's image (reading its bytes once) and write its label, all in the
    caller's transaction (small imports, the demo, tests; a large import that others should not
    wait for goes through :func:`import_staged`).

    ``annotator`` is used where a record names none; ``stain`` (HE, PAS, other) fills in the
    stain of the slides the records name. ``confine_to``: refuse image files that resolve
    (symbolic links followed) outside this folder, without saying more about them. Two records
    giving one image different labels by the same annotator are refused, naming both, unless
    ``keep_last`` (the later one wins; the report lists the lines it overrode). ``metas``: what
    :func:`read_image_metas` found before the transaction (by absolute path); images it lacks are
    read here. Raises
    :class:`FormatError`, :class:`InvalidLabelError` or :class:`ImageFileError` (its subclass
    :class:`ImageTooLargeError` over the image limits) naming the record's file and line.
    """
    session.flush()  # a dataset created in this transaction has its id

    def registered(rels: list[str]) -> set[str]:
        return set(session.scalars(select(Image.path).where(Image.dataset_id == dataset.id, Image.path.in_(rels))))

    plan = plan_import(dataset, records, registered=registered, annotator=annotator, skip_missing=skip_missing,
                       skip_duplicates=skip_duplicates, confine_to=confine_to, keep_last=keep_last, metas=metas,
                       progress=progress)
    batch_id = staging.open_batch(session, dataset.name, source)
    for images, labels in _stage_chunks(plan, staging.STAGE_CHUNK):
        staging.stage_rows(session, batch_id, images, labels)
    report = _publish(session, plan, batch_id, source=source, stain=stain, skip_duplicates=skip_duplicates)
    staging.delete_staged(None, batch_id, session=session)
    session.expire_all()
    return report


def import_staged(
    session_factory: sessionmaker[Session],
    dataset_name: str,
    records: Sequence[Record],
    *,
    class_names: Sequence[str] = (),
    root: str | Path = "",
    multi_label: bool = False,
    annotator: str,
    source: str,
    skip_missing: bool = False,
    skip_duplicates: bool = False,
    stain: str | None = None,
    progress: bool = False,
    confine_to: Path | None = None,
    keep_last: bool = False,
    metas: dict[str, ImageMeta] | None = None,
    chunk: int = 0,
    after_chunk: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import ``records`` into the dataset ``dataset_name`` (created from ``class_names`` and
    ``root`` when missing) without making anyone wait for the whole import.

    Every record is checked first, writing nothing; then the rows are written in short
    transactions of ``chunk`` (default :data:`staging.STAGE_CHUNK`) images and labels into
    staging tables nobody reads, and published by one short transaction (annotation_db.staging).
    An error at any point deletes what was staged: the store is as it was. Staged leftovers of
    imports whose process died are deleted first. ``after_chunk(done, total)`` runs after each
    staged chunk commits (progress, tests). Other arguments and errors as :func:`import_records`.
    """
    staging.clean_abandoned(session_factory)
    schema = schema_for(class_names)
    with session_factory() as s:
        try:
            dataset = get_dataset(s, dataset_name)
        except DatasetNotFoundError:
            if not schema:
                raise DatasetNotFoundError(
                    f"Dataset {dataset_name!r} does not exist and no classes are known to create it; name them "
                    "(--classes).") from None
            dataset = new_dataset(dataset_name, schema, root=root, multi_label=multi_label)

    def registered(rels: list[str]) -> set[str]:
        if dataset.id is None:
            return set()
        with session_factory() as s:
            return set(s.scalars(select(Image.path).where(Image.dataset_id == dataset.id, Image.path.in_(rels))))

    plan = plan_import(dataset, records, registered=registered, annotator=annotator, skip_missing=skip_missing,
                       skip_duplicates=skip_duplicates, confine_to=confine_to, keep_last=keep_last, metas=metas,
                       progress=progress)
    with session_factory() as s, s.begin():
        batch_id = staging.open_batch(s, dataset_name, source)
    try:
        chunks = list(_stage_chunks(plan, chunk or staging.STAGE_CHUNK))
        bar = tqdm(total=len(chunks), desc=f"stage {dataset_name}", unit="chunk", disable=not progress)
        for done, (images, labels) in enumerate(chunks, 1):
            with session_factory() as s, s.begin():
                staging.stage_rows(s, batch_id, images, labels)
            staging.yield_to_writers(session_factory)  # also before the publish
            bar.update(1)
            if after_chunk is not None:
                after_chunk(done, len(chunks))
        bar.close()
        started = time.monotonic()
        with session_factory() as s, s.begin():
            report = _publish(s, plan, batch_id, source=source, stain=stain, skip_duplicates=skip_duplicates,
                              schema=schema)
        log.info("published %s in %.2f s", report.summary(), time.monotonic() - started)
    except BaseException:
        staging.delete_staged(session_factory, batch_id)
        raise
    staging.delete_staged(session_factory, batch_id)
    return report


def read_image_metas(
    root: str | Path, records: Sequence[Record], *, confine_to: Path | None = None, progress: bool = False
) -> dict[str, ImageMeta]:
    """Hash and measure every record's image under ``root``, keyed by absolute path, before any
    write transaction opens: on SQLite the write lock is then held only while rows are written,
    not while a large import reads its files. Raises as :func:`import_records` would (file, line,
    field); missing files are left for :func:`import_records` to skip or refuse."""
    probe = Dataset(name="", root=str(Path(root).expanduser().resolve()))
    limits = ImageLimits.from_env()
    out: dict[str, ImageMeta] = {}
    for r in tqdm(records, desc="check images", unit="img", disable=not progress):
        try:
            path = resolve_in_root(probe, normalize_rel_path(probe, r.image))
        except (ImageFileError, OSError, ValueError) as e:
            raise ImageFileError(f"{r.where}: field 'image': {e}") from None
        key = str(path)
        if key in out:
            continue
        if confine_to is not None and not is_within(path, confine_to):
            raise ImageFileError(f"{r.where}: field 'image': refused: not a file under the data folder")
        try:
            if not path.is_file():
                continue
        except OSError as e:
            raise ImageFileError(f"{r.where}: field 'image': cannot use this path ({e.strerror})") from None
        try:
            out[key] = read_image_meta(path, limits)
        except ImageFileError as e:
            raise type(e)(f"{r.where}: field 'image': {e}") from None
    return out


def _repeated_images(records: Sequence[Record], rels: Sequence[str], keys: Sequence[list[str]], annotator: str,
                     keep_last: bool) -> list[str]:
    """Records that label one image twice for one annotator, differently: refused (naming both
    lines) unless ``keep_last``; then the overridden lines' places are returned."""
    first: dict[tuple[str, str], int] = {}
    overridden = []
    for i, (r, rel, k) in enumerate(zip(records, rels, keys)):
        if not k:
            continue
        who = r.annotator or annotator
        j = first.setdefault((rel, who), i)
        if j == i or (keys[j], records[j].uncertain) == (k, r.uncertain):
            continue
        if not keep_last:
            raise InvalidLabelError(
                f"{r.where}: field 'label': {rel} is labeled {', '.join(k)} here but {', '.join(keys[j])} at "
                f"{records[j].where} (both by {who}); keep one line, or pass --keep-last to let the last one win")
        overridden.append(records[j].where)
        first[(rel, who)] = i
    return overridden


def _slide_patients(records: Sequence[Record]) -> dict[str, tuple[str, str]]:
    """slide -> (patient, where of its first line): one patient per slide within the file (the
    store's are checked when publishing)."""
    seen: dict[str, tuple[str, str]] = {}
    for r in records:
        if not (r.slide and r.patient):
            continue
        first = seen.setdefault(r.slide, (r.patient, r.where))
        if first[0] != r.patient:
            raise InvalidLabelError(f"{r.where}: field 'patient': slide {r.slide!r} is patient {first[0]!r} at "
                                    f"{first[1]}, here {r.patient!r}")
    return seen


def read_records(
    fmt: str, path: str | Path, *, labels_from_subfolders: bool = False, exclude: Sequence[str] = ()
) -> tuple[list[str], list[Record]]:
    """(class names in the file's order, records) for any import format.

    ``labels_from_subfolders`` and ``exclude`` apply to the ``folders`` format only.
    """
    if fmt == "jsonl":
        return formats.read_jsonl(path)
    if fmt == "csv":
        records = formats.read_csv(path)
    elif fmt == "folders":
        records = formats.scan_folder(path, labels_from_subfolders=labels_from_subfolders, exclude=exclude)
    elif fmt == "labelstudio":
        records = formats.read_label_studio(path)
    else:
        raise FormatError(path, None, None, f"unknown format {fmt!r}; use one of {', '.join(formats.FORMATS)}")
    return class_names_of(records), records
