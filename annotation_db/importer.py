"""Write what a label file holds into the store, in batches whose cost does not grow with the
store: every lookup is an indexed ``IN`` query over the batch, every write one statement per batch.

The caller owns the transaction: an error anywhere (malformed line, unknown class, missing file)
raises before commit, so nothing of the file is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.orm import Session
from tqdm.auto import tqdm

from annotation_db import formats
from annotation_db.classes import ClassKeys, schema_for
from annotation_db.formats import FormatError, Record
from annotation_db.paths import is_within
from annotation_db.models import Dataset, Image, Label
from annotation_db.store import (
    ImageFileError,
    ImageLimits,
    ImageMeta,
    InvalidLabelError,
    get_or_create_annotator,
    get_or_create_dataset,
    get_or_create_slide,
    normalize_rel_path,
    read_image_meta,
    resolve_in_root,
    set_labels_bulk,
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
    """Register every record's image (reading its bytes once) and write its label.

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
    report = ImportReport(dataset=dataset.name, records=len(records))
    limits = ImageLimits.from_env()
    _record_patients(session, records, stain)
    class_keys = ClassKeys.of(dataset)
    annotator_ids: dict[str, int] = {}
    slide_ids: dict[str, int] = {}
    image_table = Image.__table__
    is_pg = session.get_bind().dialect.name == "postgresql"
    if is_pg:
        session.execute(text("ANALYZE image, label"))
    # Every record is checked before the first write: paths, classes, repeated images.
    all_rels: list[str] = []
    for r in records:
        try:
            all_rels.append(normalize_rel_path(dataset, r.image))
        except (ImageFileError, OSError, ValueError) as e:
            raise ImageFileError(f"{r.where}: field 'image': {e}") from None
    all_keys = [_keys_for(r, dataset, class_keys) for r in records]
    report.overridden = _repeated_images(records, all_rels, all_keys, annotator, keep_last)
    bar = tqdm(total=len(records), desc=f"import {dataset.name}", unit="img", disable=not progress)
    for start in range(0, len(records), BATCH_SIZE):
        batch = records[start : start + BATCH_SIZE]
        rels = all_rels[start : start + BATCH_SIZE]
        keys = all_keys[start : start + BATCH_SIZE]

        existing = dict(
            session.execute(
                select(Image.path, Image.id).where(Image.dataset_id == dataset.id, Image.path.in_(set(rels)))
            ).all()
        )
        new_rows: dict[str, dict] = {}
        skip: set[int] = set()
        for i, (r, rel) in enumerate(zip(batch, rels)):
            if rel in existing or rel in new_rows:
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
                    skip.add(i)
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
            slide_id = None
            if r.slide:
                if r.slide not in slide_ids:
                    slide_ids[r.slide] = get_or_create_slide(session, r.slide, stain=stain).id
                slide_id = slide_ids[r.slide]
            new_rows[rel] = dict(
                dataset_id=dataset.id,
                path=rel,
                sha256=meta.sha256,
                width=meta.width,
                height=meta.height,
                slide_id=slide_id,
                _index=i,
            )

        # Duplicates by content: against the store, and within this batch.
        by_hash: dict[str, str] = {}
        if new_rows:
            hashes = {row["sha256"] for row in new_rows.values()}
            by_hash = dict(
                session.execute(
                    select(Image.sha256, Image.path).where(Image.dataset_id == dataset.id, Image.sha256.in_(hashes))
                ).all()
            )
        for rel, row in list(new_rows.items()):
            twin = by_hash.get(row["sha256"])
            if twin is not None and twin != rel:
                report.duplicates.append((rel, twin))
                if skip_duplicates:
                    report.duplicates_skipped += 1
                    skip.add(row["_index"])
                    del new_rows[rel]
                    continue
            by_hash.setdefault(row["sha256"], rel)

        if new_rows:
            inserted = session.execute(
                image_table.insert().returning(image_table.c.path, image_table.c.id),
                [{k: v for k, v in row.items() if k != "_index"} for row in new_rows.values()],
            ).all()
            existing.update(dict(inserted))
            report.images_added += len(inserted)
        report.images_existing += sum(
            1 for i, rel in enumerate(rels) if i not in skip and rel in existing and rel not in new_rows
        )

        # Labels: last record wins per (image, annotator); unchanged labels write no history.
        wanted: dict[tuple[int, int], tuple[list[str], bool]] = {}
        for i, (r, rel, k) in enumerate(zip(batch, rels, keys)):
            if i in skip or not k:
                continue
            name = r.annotator or annotator
            if name not in annotator_ids:
                annotator_ids[name] = get_or_create_annotator(session, name).id
            wanted[(existing[rel], annotator_ids[name])] = (k, r.uncertain)
        if wanted:
            # Two plain IN lists (not a row-value IN, which PostgreSQL may answer with a scan).
            current = {
                (i, a): (list(c), u)
                for i, a, c, u in session.execute(
                    select(Label.image_id, Label.annotator_id, Label.classes, Label.uncertain).where(
                        Label.image_id.in_({i for i, _ in wanted}), Label.annotator_id.in_({a for _, a in wanted})
                    )
                )
            }
            changed = [(i, a, k, u, "") for (i, a), (k, u) in wanted.items() if current.get((i, a)) != (k, u)]
            set_labels_bulk(session, changed, source=source)
            report.labels_written += len(changed)
            report.labels_unchanged += len(wanted) - len(changed)
        bar.update(len(batch))
        batch_no = start // BATCH_SIZE + 1
        if is_pg and batch_no & (batch_no - 1) == 0:
            # The planner's statistics predate this transaction's rows: without a fresh ANALYZE,
            # PostgreSQL keeps treating the tables as tiny and scans them whole for every batch.
            session.execute(text("ANALYZE image, label"))
    bar.close()
    session.flush()
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


def _record_patients(session: Session, records: Sequence[Record], stain: str | None) -> None:
    """The patient each named slide belongs to: one per slide, in the file and in the store."""
    seen: dict[str, tuple[str, str]] = {}
    for r in records:
        if not (r.slide and r.patient):
            continue
        first = seen.setdefault(r.slide, (r.patient, r.where))
        if first[0] != r.patient:
            raise InvalidLabelError(f"{r.where}: field 'patient': slide {r.slide!r} is patient {first[0]!r} at "
                                    f"{first[1]}, here {r.patient!r}")
    for slide, (patient, where) in seen.items():
        try:
            get_or_create_slide(session, slide, stain=stain, patient=patient)
        except InvalidLabelError as e:
            raise InvalidLabelError(f"{where}: field 'patient': {e}") from None


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
