"""Label file formats: readers that turn a file into :class:`Record` s, writers that export a
dataset. Readers never touch the store; :mod:`annotation_db.importer` writes what they read.

- ``jsonl``: the original labeling system's format, one JSON object per image with one-hot
  class keys by display name: ``{"image_name": "a.png", "正常肾小球": 1, "节段性硬化": 0, ...}``.
  A JSON array of the same objects is read too. UTF-8, non-ASCII kept.
- ``csv``: ``image,label[,annotator][,slide]`` (``path``/``image_name`` and ``slide_id`` accepted;
  several classes joined by ``;`` for multi-label datasets).
- ``folders``: ImageFolder layout, ``ROOT/<class>/<image>``.
- ``labelstudio``: Label Studio JSON tasks with ``choices`` results.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from sqlalchemy import select
from sqlalchemy.orm import Session

from annotation_db.db import StoreError
from annotation_db.images import IMAGE_SUFFIXES
from annotation_db.label_resolution import dataset_images, resolve_labels
from annotation_db.models import Dataset, Slide

FORMATS = ("jsonl", "csv", "folders", "labelstudio")
JSONL_IMAGE_KEY = "image_name"
MULTI_SEP = ";"
LABEL_STUDIO_FROM = "class"
LABEL_STUDIO_TO = "image"


class FormatError(StoreError):
    """A label file is malformed; the message names the file, the line and the field."""

    def __init__(self, file: str | Path, line: int | None, field: str | None, problem: str):
        self.file, self.line, self.field = str(file), line, field
        where = f"{file}" + (f", line {line}" if line else "") + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {problem}")


@dataclass
class Record:
    """One image of a label file. ``classes`` None = registered without a label."""

    image: str
    classes: list[str] | None
    where: str
    annotator: str | None = None
    slide: str | None = None
    uncertain: bool = False
    patient: str | None = None
    centre: str | None = None  # the hospital / scanner site (CSV ``centre``/``center``/``site`` column)


# --- readers -----------------------------------------------------------------------------------

MAX_IMAGE_NAME_CHARS = 1024  # a crop's path relative to its dataset root
MAX_NAME_PART_BYTES = 255  # one folder or file name (the file system's own limit)
CSV_FIELD_LIMIT = csv.field_size_limit()  # 131072 characters unless changed


def image_name_problem(image: str) -> str | None:
    """Why ``image`` cannot name a crop's file (too long, a NUL byte), or None when it can."""
    if len(image) > MAX_IMAGE_NAME_CHARS:
        return f"image path of {len(image)} characters is too long (at most {MAX_IMAGE_NAME_CHARS})"
    if "\x00" in image:
        return "image path holds a NUL byte"
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in image.replace("\\", "/").split("/")),
                  default=0)
    if longest > MAX_NAME_PART_BYTES:
        return f"a file or folder name of {longest} bytes in the image path (at most {MAX_NAME_PART_BYTES})"
    return None


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (BOM dropped); bad bytes raise :class:`FormatError` with their line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FormatError(path, None, None, f"cannot read ({e.strerror or type(e).__name__})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise FormatError(path, line, None, f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
                                            "save the file as UTF-8") from None


def _iter_json_objects(path: Path) -> Iterator[tuple[int, object]]:
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(path, e.lineno, None, f"invalid JSON array: {e.msg} (column {e.colno})") from None
        for i, obj in enumerate(items, 1):
            yield i, obj  # array element index stands in for the line
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(path, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None


def read_jsonl(path: str | Path) -> tuple[list[str], list[Record]]:
    """Read the seed labeling system's file: (class names in file order, records)."""
    path = Path(path)
    class_names: list[str] | None = None
    records: list[Record] = []
    for lineno, obj in _iter_json_objects(path):
        if not isinstance(obj, dict):
            raise FormatError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
        image = obj.get(JSONL_IMAGE_KEY)
        if not isinstance(image, str) or not image.strip():
            raise FormatError(path, lineno, JSONL_IMAGE_KEY, "missing or empty image name")
        if problem := image_name_problem(image):
            raise FormatError(path, lineno, JSONL_IMAGE_KEY, problem)
        names = [k for k in obj if k != JSONL_IMAGE_KEY]
        if class_names is None:
            if not names:
                raise FormatError(path, lineno, None, "no class keys besides 'image_name'")
            class_names = names
        elif set(names) != set(class_names):
            missing = [c for c in class_names if c not in names]
            extra = [c for c in names if c not in class_names]
            field = (missing or extra)[0]
            raise FormatError(
                path, lineno, field,
                f"class keys differ from line 1's ({'missing ' + ', '.join(missing) if missing else ''}"
                f"{'; ' if missing and extra else ''}{'unknown ' + ', '.join(extra) if extra else ''})",
            )
        classes = []
        for name in class_names:
            value = obj[name]
            if type(value) is not int or value not in (0, 1):
                raise FormatError(path, lineno, name, f"one-hot value must be 0 or 1, got {value!r}")
            if value == 1:
                classes.append(name)
        records.append(Record(image=image, classes=classes or None, where=f"{path}:{lineno}"))
    if class_names is None:
        raise FormatError(path, None, None, "no records")
    return class_names, records


_CSV_IMAGE = ("image", "path", "image_name", "file", "filename")
_CSV_SLIDE = ("slide", "slide_id", "slide_name")
_CSV_PATIENT = ("patient", "patient_id")
_CSV_CENTRE = ("centre", "center", "site")


class _Utf8Lines:
    """The file's lines as text, counting them; a line that is not UTF-8 raises
    :class:`FormatError` naming it."""

    def __init__(self, path: Path, f) -> None:  # noqa: ANN001 - a binary file
        self.path, self.f, self.lineno = path, f, 0

    def __iter__(self) -> _Utf8Lines:
        return self

    def __next__(self) -> str:
        raw = next(self.f)
        self.lineno += 1
        if self.lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(self.path, self.lineno, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                                            f"{e.start + 1}); save the file as UTF-8") from None


@contextmanager
def _csv_reader(path: Path) -> Iterator[tuple[csv.DictReader, list[str]]]:
    """A ``DictReader`` over ``path`` (UTF-8, BOM tolerated) with its header lower-cased and
    stripped; a header naming a column twice is refused."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise FormatError(path, None, None, f"cannot open ({e.strerror})") from None
    with f:
        lines = _Utf8Lines(path, f)
        reader = csv.DictReader(lines)
        reader.lines = lines  # where a parse error happened: the line being read, not the last row's
        try:
            fieldnames = reader.fieldnames or []
        except csv.Error as e:
            raise FormatError(path, lines.lineno or 1, None, _csv_problem(e)) from None
        header = [h.strip().lower() for h in fieldnames]
        seen: dict[str, int] = {}
        for i, name in enumerate(header, 1):
            if name and name in seen:
                raise FormatError(path, 1, name, f"column {name!r} appears twice in the header (columns "
                                                 f"{seen[name]} and {i}); keep one")
            seen[name] = i
        reader.fieldnames = header
        yield reader, header


def _csv_problem(e: csv.Error) -> str:
    if "field larger than field limit" in str(e):
        return f"a field is longer than {CSV_FIELD_LIMIT} characters (an unclosed quote?)"
    return f"not valid CSV ({e})"


def _csv_rows(path: Path, reader: csv.DictReader, header: list[str]) -> Iterator[tuple[int, dict]]:
    """(line, row) of every data row; a row with more or fewer fields than the header, or that
    the CSV parser refuses, raises :class:`FormatError` naming its line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise FormatError(path, reader.lines.lineno, None, _csv_problem(e)) from None
        lineno = reader.line_num
        if None in row:
            n = len(header) + len(row[None])
            raise FormatError(path, lineno, None, f"{n} fields, the header has {len(header)} "
                                                  "(a comma too many, or a name with a comma that is not quoted?)")
        missing = [k for k, v in row.items() if v is None]
        if missing:
            raise FormatError(path, lineno, missing[0], f"{len(header) - len(missing)} fields, the header has "
                                                        f"{len(header)}")
        yield lineno, row


def _shown(header: list[str]) -> str:
    """A header as an error message shows it: short names only, so a stray file is not echoed."""
    names = [h if len(h) <= 40 else h[:37] + "..." for h in header[:8]]
    return str(names) + (f" and {len(header) - 8} more" if len(header) > 8 else "")


def read_csv(path: str | Path) -> list[Record]:
    """Read ``image,label[,annotator][,slide][,patient][,centre]`` rows (header required)."""
    path = Path(path)
    with _csv_reader(path) as (reader, header):
        image_col = next((c for c in _CSV_IMAGE if c in header), None)
        if image_col is None or "label" not in header:
            raise FormatError(path, 1, None, f"header must name an image column and 'label', got {_shown(header)}")
        images = [c for c in _CSV_IMAGE if c in header]
        if len(images) > 1:
            raise FormatError(path, 1, images[1], f"two image columns ({', '.join(images)}); keep one")
        slide_col = next((c for c in _CSV_SLIDE if c in header), None)
        patient_col = next((c for c in _CSV_PATIENT if c in header), None)
        centre_col = next((c for c in _CSV_CENTRE if c in header), None)
        records = []
        for lineno, row in _csv_rows(path, reader, header):
            image = (row.get(image_col) or "").strip()
            if not image:
                raise FormatError(path, lineno, image_col, "empty image path")
            if problem := image_name_problem(image):
                raise FormatError(path, lineno, image_col, problem)
            for col, limit in (("annotator", 200), (slide_col, 300), (patient_col, 200), (centre_col, 200)):
                if col and len((row.get(col) or "").strip()) > limit:
                    raise FormatError(path, lineno, col, f"at most {limit} characters")
            raw = (row.get("label") or "").strip()
            classes = [c.strip() for c in raw.split(MULTI_SEP) if c.strip()] or None
            records.append(
                Record(
                    image=image,
                    classes=classes,
                    where=f"{path}:{lineno}",
                    annotator=(row.get("annotator") or "").strip() or None,
                    slide=((row.get(slide_col) or "").strip() or None) if slide_col else None,
                    patient=((row.get(patient_col) or "").strip() or None) if patient_col else None,
                    centre=((row.get(centre_col) or "").strip() or None) if centre_col else None,
                )
            )
            if records[-1].patient and not records[-1].slide:
                raise FormatError(path, lineno, patient_col, "a patient needs the slide it belongs to (slide column)")
    return records


def read_patient_csv(path: str | Path) -> list[tuple[str, str, str]]:
    """``(slide, patient, where)`` rows of a CSV with ``slide`` and ``patient`` columns (header
    required; ``slide_id``/``patient_id`` also accepted; one patient per slide)."""
    path = Path(path)
    with _csv_reader(path) as (reader, header):
        slide_col = next((c for c in _CSV_SLIDE if c in header), None)
        patient_col = next((c for c in _CSV_PATIENT if c in header), None)
        if slide_col is None or patient_col is None:
            raise FormatError(path, 1, None, f"header must name a slide and a patient column, got {_shown(header)}")
        rows, seen = [], {}
        for lineno, row in _csv_rows(path, reader, header):
            slide, patient = (row.get(slide_col) or "").strip(), (row.get(patient_col) or "").strip()
            if not slide:
                raise FormatError(path, lineno, slide_col, "empty slide name")
            if seen.setdefault(slide, patient) != patient:
                raise FormatError(path, lineno, patient_col,
                                  f"slide {slide!r} is patient {seen[slide]!r} above, {patient!r} here")
            rows.append((slide, patient, f"{path}:{lineno}"))
    return rows


def scan_folder(
    folder: str | Path, *, labels_from_subfolders: bool = False, exclude: Sequence[str] = ()
) -> list[Record]:
    """Every image under ``folder`` (sorted); the first sub-folder names the class when asked.

    ``exclude``: glob patterns matched against each relative path and each of its folders
    (``_masks`` leaves out a ``_masks/`` folder anywhere).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(folder, None, None, "not a folder")
    records = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        rel = p.relative_to(folder).as_posix()
        if any(fnmatch.fnmatch(rel, pat) or any(fnmatch.fnmatch(part, pat) for part in rel.split("/")[:-1]) for pat in exclude):
            continue
        classes = None
        if labels_from_subfolders:
            parts = rel.split("/")
            if len(parts) < 2:
                raise FormatError(p, None, "folder", "image sits directly in the root, not in a class sub-folder")
            classes = [parts[0]]
        records.append(Record(image=rel, classes=classes, where=str(p)))
    return records


def _label_studio_image(data: dict) -> str | None:
    if isinstance(data.get("glom_path"), str):
        return data["glom_path"]
    image = data.get("image")
    if not isinstance(image, str):
        return None
    # Local-files URLs carry the path in ?d=...; anything else: keep the last path part.
    from urllib.parse import parse_qs, unquote, urlparse

    parsed = urlparse(image)
    if "d" in parse_qs(parsed.query):
        return unquote(parse_qs(parsed.query)["d"][0])
    return unquote(parsed.path.rsplit("/", 1)[-1]) if parsed.scheme else image


def read_label_studio(path: str | Path) -> list[Record]:
    """Read Label Studio JSON tasks: one record per completed annotation (or per task without one).

    Every part a record is made of is type-checked; a wrong type names the task and the field
    (``[3].annotations[0].result``), and the line is that of the task in the file when known.
    """
    path = Path(path)
    text = _read_text(path)
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(path, e.lineno, None, f"invalid JSON: {e.msg}") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise FormatError(path, None, None, "expected a list of tasks")

    def bad(i: int, field: str, problem: str) -> FormatError:
        return FormatError(path, None, f"[{i}]{field}", problem)

    def kind(value: object) -> str:
        return "null" if value is None else {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)

    records = []
    for i, task in enumerate(tasks):
        where = f"{path}:task {i}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise FormatError(path, None, f"[{i}].data", "task has no 'data' object")
        image = _label_studio_image(task["data"])
        if not image:
            raise FormatError(path, None, f"[{i}].data.image", "task has no image")
        if problem := image_name_problem(image):
            raise bad(i, ".data.image", problem)
        slide = task["data"].get("slide") if isinstance(task["data"].get("slide"), str) else None
        annotations = task.get("annotations")
        if annotations is None:
            annotations = []
        if not isinstance(annotations, list):
            raise bad(i, ".annotations", f"expected an array of annotations, got {kind(annotations)}")
        kept = []
        for j, a in enumerate(annotations):
            if not isinstance(a, dict):
                raise bad(i, f".annotations[{j}]", f"expected an annotation object, got {kind(a)}")
            if not a.get("was_cancelled"):
                kept.append((j, a))
        if not kept:
            records.append(Record(image=image, classes=None, where=where, slide=slide))
        for j, a in kept:
            result = a.get("result")
            if result is None:
                result = []
            if not isinstance(result, list):
                raise bad(i, f".annotations[{j}].result", f"expected an array of results, got {kind(result)}")
            choices: list[str] = []
            for k, r in enumerate(result):
                field = f".annotations[{j}].result[{k}]"
                if not isinstance(r, dict):
                    raise bad(i, field, f"expected a result object, got {kind(r)}")
                if r.get("type") != "choices":
                    continue
                value = r.get("value")
                if not isinstance(value, dict):
                    raise bad(i, f"{field}.value", f"expected an object with 'choices', got {kind(value)}")
                picked = value.get("choices", [])
                if not isinstance(picked, list) or not all(isinstance(c, str) for c in picked):
                    raise bad(i, f"{field}.value.choices", f"expected an array of class names, got {kind(picked)}"
                              + (" with other items" if isinstance(picked, list) else ""))
                choices.extend(picked)
            who = a.get("completed_by")
            if isinstance(who, dict):
                who = who.get("email") or who.get("username") or who.get("id")
            if who is not None and not isinstance(who, (str, int)):
                raise bad(i, f".annotations[{j}].completed_by", f"expected a user name, id or object, got {kind(who)}")
            if who is not None and len(str(who)) > 200:
                raise bad(i, f".annotations[{j}].completed_by", "an annotator name may have at most 200 characters")
            records.append(
                Record(
                    image=image,
                    classes=choices or None,
                    where=where,
                    annotator=str(who) if who is not None else None,
                    slide=slide,
                )
            )
    return records


# --- writers -----------------------------------------------------------------------------------


def _atomic_write_text(out: Path, text: str) -> None:
    """Write ``text`` to ``out`` through a temp file, so a crash leaves the old file or none."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class ExportReport:
    path: Path
    images: int
    labeled: int
    undecided: int


def export_jsonl(
    session: Session, dataset: Dataset, out: str | Path, *, source: str = "majority", labeled_only: bool = False
) -> ExportReport:
    """Write the seed system's JSON lines: every image (all zeros when unlabeled), schema order."""
    resolved = resolve_labels(session, dataset, source)
    schema = [(c.key, c.display_name) for c in dataset.classes]  # once, not per image
    lines, labeled = [], 0
    for image, _slide in dataset_images(session, dataset):
        classes = resolved.by_image.get(image.id)
        if classes:
            labeled += 1
        elif labeled_only:
            continue
        obj = {JSONL_IMAGE_KEY: image.path}
        for key, name in schema:
            obj[name] = int(bool(classes) and key in classes)
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    _atomic_write_text(Path(out), "".join(lines))
    return ExportReport(Path(out), len(lines), labeled, len(resolved.undecided))


def export_csv(session: Session, dataset: Dataset, out: str | Path, *, source: str = "majority") -> ExportReport:
    """Write ``image,label,slide`` for every labeled image (class keys; ``;`` joins multi-label),
    and a ``patient`` column when any of the dataset's slides records one."""
    import io

    resolved = resolve_labels(session, dataset, source)
    patients = dict(session.execute(select(Slide.name, Slide.patient).where(Slide.patient.is_not(None))).all())
    images = dataset_images(session, dataset)
    with_patient = any(slide in patients for _, slide in images)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "label", "slide", *(["patient"] if with_patient else [])])
    n = 0
    for image, slide in images:
        classes = resolved.by_image.get(image.id)
        if classes:
            row = [image.path, MULTI_SEP.join(classes), slide or ""]
            writer.writerow(row + ([patients.get(slide, "")] if with_patient else []))
            n += 1
    _atomic_write_text(Path(out), buf.getvalue())
    return ExportReport(Path(out), n, n, len(resolved.undecided))


def export_class_folders(
    session: Session, dataset: Dataset, out: str | Path, *, source: str = "majority", link: bool = False
) -> ExportReport:
    """ImageFolder layout ``OUT/<class key>/<file>`` (copies, or hard links with ``link``).

    Nested paths are flattened with ``__`` so two crops with one file name cannot collide.
    """
    out = Path(out)
    resolved = resolve_labels(session, dataset, source)
    root = Path(dataset.root or ".")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    n = 0
    try:
        for c in dataset.classes:
            (staging / c.key).mkdir()
        for image, _slide in dataset_images(session, dataset):
            for key in resolved.by_image.get(image.id, []):
                src, dst = root / image.path, staging / key / image.path.replace("/", "__")
                if not src.is_file():
                    raise StoreError(f"{src}: image file of {image.path!r} is missing; cannot export it")
                if link:
                    try:
                        os.link(src, dst)
                        continue
                    except OSError:
                        pass
                shutil.copy2(src, dst)
            n += bool(resolved.by_image.get(image.id))
        if out.exists():
            if any(out.iterdir()):
                raise StoreError(f"{out}: export folder exists and is not empty; choose a new one")
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(out, n, n, len(resolved.undecided))


def label_studio_config(dataset: Dataset) -> str:
    """The labeling config XML that matches :func:`export_label_studio`'s tasks."""
    choice = "multiple" if dataset.multi_label else "single"
    options = "\n".join(f"    <Choice value={quoteattr(c.display_name)}/>" for c in dataset.classes)
    return (
        f'<View>\n  <Image name="{LABEL_STUDIO_TO}" value="$image" zoom="true"/>\n'
        f'  <Choices name="{LABEL_STUDIO_FROM}" toName="{LABEL_STUDIO_TO}" choice="{choice}" showInLine="true">\n'
        f"{options}\n  </Choices>\n</View>\n"
    )


def export_label_studio(
    session: Session,
    dataset: Dataset,
    out: str | Path,
    *,
    source: str = "majority",
    url_prefix: str = "/data/local-files/?d=",
) -> ExportReport:
    """Label Studio tasks (every image; labeled ones carry an annotation with ``choices``).

    Writes the matching labeling config beside it as ``<out>.config.xml``.
    """
    resolved = resolve_labels(session, dataset, source)
    display = {c.key: c.display_name for c in dataset.classes}
    tasks, n = [], 0
    for image, slide in dataset_images(session, dataset):
        task: dict = {"data": {"image": url_prefix + image.path, "glom_path": image.path}}
        if slide:
            task["data"]["slide"] = slide
        classes = resolved.by_image.get(image.id)
        if classes:
            n += 1
            task["annotations"] = [
                {
                    "result": [
                        {
                            "from_name": LABEL_STUDIO_FROM,
                            "to_name": LABEL_STUDIO_TO,
                            "type": "choices",
                            "value": {"choices": [display[k] for k in classes]},
                        }
                    ],
                    "was_cancelled": False,
                    "ground_truth": source in ("adjudicated", "final"),
                }
            ]
        tasks.append(task)
    out = Path(out)
    _atomic_write_text(out, json.dumps(tasks, ensure_ascii=False, indent=1) + "\n")
    _atomic_write_text(out.with_name(out.name + ".config.xml"), label_studio_config(dataset))
    return ExportReport(out, len(tasks), n, len(resolved.undecided))


EXPORTERS = {
    "jsonl": export_jsonl,
    "csv": export_csv,
    "folders": export_class_folders,
    "labelstudio": export_label_studio,
}
