"""Bad images and label files at import: each is refused with a named error that says the file,
the line and the field, and the store stays as it was (issue 11, part 2)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from sqlalchemy import func, select

from annotation_db import formats, importer
from annotation_db.classes import InvalidLabelError
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.formats import FormatError
from annotation_db.images import ImageTooLargeError, read_image_meta
from annotation_db.models import Image, Label, LabelEvent

REPO = Path(__file__).resolve().parents[1]


def png_header(width: int, height: int, extra: bytes = b"") -> bytes:
    """A PNG whose header announces ``width`` × ``height`` (bytes tiny: a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + extra + \
        chunk(b"IEND", b"")


@pytest.fixture
def crops(tmp_path: Path, bueno_dir: Path) -> Path:
    root = tmp_path / "crops"
    root.mkdir()
    for i, p in enumerate(sorted(bueno_dir.glob("globally_sclerotic/*.png"))[:3]):
        (root / f"c{i}.png").write_bytes(p.read_bytes())
    return root


@pytest.fixture
def Session(tmp_path: Path):  # noqa: N802
    engine = create_store_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def _import_csv(Session, path: Path, root: Path, **kw):  # noqa: N803
    records = formats.read_csv(path)
    with Session() as s, s.begin():
        ds = importer.ensure_dataset(s, "d", class_names=["normal", "crescent"], root=root)
        return importer.import_records(s, ds, records, annotator="imported", source="import:csv", **kw)


def _counts(Session) -> tuple[int, int, int]:  # noqa: N803
    with Session() as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (Image, Label, LabelEvent))


# --- images ------------------------------------------------------------------------------------


def test_a_144_megapixel_png_is_refused_at_import_as_a_named_error(Session, crops, tmp_path, monkeypatch):
    (crops / "huge.png").write_bytes(png_header(12_000, 12_000))
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\nc0.png,normal\nhuge.png,crescent\n")
    with pytest.raises(ImageTooLargeError, match=r"labels\.csv:3: field 'image': .*12000×12000 pixels is over"):
        _import_csv(Session, labels, crops)
    assert _counts(Session) == (0, 0, 0)
    monkeypatch.setenv("GLOM_IMPORT_MAX_PIXELS", "200000000")  # configurable: a site with big crops
    report = _import_csv(Session, labels, crops)
    assert report.images_added == 2


def test_a_decompression_bomb_is_a_named_error_not_a_traceback(Session, crops, tmp_path):
    (crops / "bomb.png").write_bytes(png_header(30_000, 30_000))
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\nbomb.png,normal\n")
    with pytest.raises(ImageTooLargeError, match=r"labels\.csv:2: field 'image': .*over the limit"):
        _import_csv(Session, labels, crops)
    out = subprocess.run([sys.executable, "-m", "core.cli", "--db", f"sqlite:///{tmp_path / 'cli.db'}", "import",
                          "csv", str(labels), "--dataset", "d", "--root", str(crops), "--classes", "normal,crescent"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "labels.csv:2: field 'image'" in out.stderr and "over the limit" in out.stderr


def _meta_in_small_memory(path: Path) -> subprocess.CompletedProcess:
    """read_image_meta(path) in a process that may use at most 1 GiB of address space."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from pathlib import Path; from annotation_db.images import read_image_meta, ImageFileError\n"
            "try:\n    read_image_meta(Path(sys.argv[1]))\nexcept ImageFileError as e:\n"
            "    print(type(e).__name__, e)\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_a_3_gb_file_is_judged_by_its_header_not_read_whole(tmp_path):
    fake = tmp_path / "scan.png"
    with fake.open("wb") as f:  # sparse: 3 GB on paper, nothing on disk
        f.write(b"this is not a PNG at all")
        f.truncate(3 * 2**30)
    out = _meta_in_small_memory(fake)
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.startswith("ImageFileError") and "not an image" in out.stdout
    real = tmp_path / "big.png"
    with real.open("wb") as f:  # a real PNG header, then 3 GB
        f.write(png_header(200, 200))
        f.truncate(3 * 2**30)
    out = _meta_in_small_memory(real)
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.startswith("ImageTooLargeError") and "MiB is over the limit" in out.stdout


def test_the_streamed_hash_is_the_hash_of_the_bytes(crops):
    import hashlib

    meta = read_image_meta(crops / "c0.png")
    assert meta.sha256 == hashlib.sha256((crops / "c0.png").read_bytes()).hexdigest()
    assert (meta.width, meta.height) == (224, 224)


# --- CSV ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, line, field, problem", [
    (b"image,label\nc0.png,normal\nc1\xff.png,normal\n", 3, None, "not UTF-8 text (byte 0xff at column 3)"),
    (b"image,label\nc0.png,normal\nc1.png,\"" + b"x" * 140_000 + b"\"\n", 3, None, "longer than 131072 characters"),
    (b"image,label\nc0.png,normal\nc1.png\n", 3, "label", "1 fields, the header has 2"),
    (b"image,label\nc0.png,normal\nc1.png,normal,extra\n", 3, None, "3 fields, the header has 2"),
    (b"image,label,label\nc0.png,normal,crescent\n", 1, "label", "column 'label' appears twice"),
    (b"image,path,label\nc0.png,c1.png,normal\n", 1, "path", "two image columns"),
    (b"image,label\n" + b"a" * 5000 + b".png,normal\n", 2, "image", "image path of 5004 characters is too long"),
    (b"image,label\n" + b"d/" + b"a" * 300 + b".png,normal\n", 2, "image", "name of 304 bytes"),
    (b"image,label,annotator\nc0.png,normal," + b"n" * 201 + b"\n", 2, "annotator", "at most 200 characters"),
])
def test_every_bad_csv_names_file_line_and_field(tmp_path, body, line, field, problem):
    path = tmp_path / "labels.csv"
    path.write_bytes(body)
    with pytest.raises(FormatError) as err:
        formats.read_csv(path)
    assert (err.value.line, err.value.field) == (line, field), str(err.value)
    assert problem in str(err.value) and str(path) in str(err.value)


def test_the_patient_csv_reader_is_as_strict(tmp_path):
    path = tmp_path / "patients.csv"
    path.write_bytes(b"slide,patient\nS1,P1\nS2,P\xe92\n")
    with pytest.raises(FormatError, match=r"line 3: not UTF-8"):
        formats.read_patient_csv(path)
    path.write_bytes(b"slide,patient\nS1,P1,extra\n")
    with pytest.raises(FormatError, match=r"line 2: 3 fields, the header has 2"):
        formats.read_patient_csv(path)


def test_jsonl_names_the_line_of_bad_bytes_and_long_names(tmp_path):
    path = tmp_path / "labels.jsonl"
    good = json.dumps({"image_name": "c0.png", "正常肾小球": 1}, ensure_ascii=False).encode()
    path.write_bytes(good + b"\n" + good.replace(b"c0", b"c\xff") + b"\n")
    with pytest.raises(FormatError, match=r"line 2: not UTF-8"):
        formats.read_jsonl(path)
    path.write_text(json.dumps({"image_name": "x" * 5000 + ".png", "正常肾小球": 1}) + "\n")
    with pytest.raises(FormatError, match=r"line 1, field 'image_name': image path of 5004 characters"):
        formats.read_jsonl(path)


# --- Label Studio --------------------------------------------------------------------------------


@pytest.mark.parametrize("annotations, field, problem", [
    ("not a list", "[0].annotations", "expected an array of annotations, got string"),
    ([1], "[0].annotations[0]", "expected an annotation object, got int"),
    ([{"result": {"type": "choices"}}], "[0].annotations[0].result", "expected an array of results, got object"),
    ([{"result": ["x"]}], "[0].annotations[0].result[0]", "expected a result object, got string"),
    ([{"result": [{"type": "choices", "value": "normal"}]}], "[0].annotations[0].result[0].value",
     "expected an object with 'choices', got string"),
    ([{"result": [{"type": "choices", "value": {"choices": "normal"}}]}],
     "[0].annotations[0].result[0].value.choices", "expected an array of class names, got string"),
    ([{"result": [], "completed_by": [1]}], "[0].annotations[0].completed_by", "expected a user name"),
])
def test_label_studio_wrong_types_name_task_and_field(tmp_path, annotations, field, problem):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"data": {"image": "c0.png"}, "annotations": annotations}]))
    with pytest.raises(FormatError) as err:
        formats.read_label_studio(path)
    assert err.value.field == field and problem in str(err.value), str(err.value)


def test_label_studio_bad_bytes_and_long_names(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_bytes(b'[\n{"data": {"image": "c0.png"}},\n{"data": {"image": "c\xff.png"}}\n]')
    with pytest.raises(FormatError, match=r"line 3: not UTF-8"):
        formats.read_label_studio(path)
    path.write_text(json.dumps([{"data": {"image": "y" * 5000}}]))
    with pytest.raises(FormatError, match=r"field '\[0\]\.data\.image': image path of 5000 characters"):
        formats.read_label_studio(path)


# --- the same image twice ----------------------------------------------------------------------------


def test_two_lines_giving_one_image_different_labels_are_refused(Session, crops, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\nc0.png,normal\nc1.png,normal\nc0.png,crescent\n")
    with pytest.raises(InvalidLabelError) as err:
        _import_csv(Session, labels, crops)
    message = str(err.value)
    assert f"{labels}:4: field 'label'" in message and f"{labels}:2" in message and "--keep-last" in message
    assert _counts(Session) == (0, 0, 0)
    report = _import_csv(Session, labels, crops, keep_last=True)
    assert report.overridden == [f"{labels}:2"]
    with Session() as s:
        classes = dict(s.execute(select(Image.path, Label.classes).join(Label, Label.image_id == Image.id)).all())
    assert classes == {"c0.png": ["crescent"], "c1.png": ["normal"]}


def test_the_same_label_twice_or_by_two_annotators_is_fine(Session, crops, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label,annotator\nc0.png,normal,a\nc0.png,normal,a\nc0.png,crescent,b\n")
    report = _import_csv(Session, labels, crops)
    assert report.labels_written == 2 and not report.overridden


def test_the_cli_refuses_repeated_lines_unless_asked(tmp_path, crops):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\nc0.png,normal\nc0.png,crescent\n")
    cmd = [sys.executable, "-m", "core.cli", "--db", f"sqlite:///{tmp_path / 'cli.db'}", "import", "csv",
           str(labels), "--dataset", "d", "--root", str(crops), "--classes", "normal,crescent"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and "labels.csv:3: field 'label'" in out.stderr, out.stderr
    out = subprocess.run([*cmd, "--keep-last"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and "1 earlier lines for the same image replaced" in out.stdout, out.stderr
