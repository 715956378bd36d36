"""Label formats: every import/export round-trips; bad input names file, line and field and stores
nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from annotation_db import formats, importer, store
from annotation_db.classes import GLOMERULUS_CLASSES, InvalidLabelError
from annotation_db.formats import FormatError
from annotation_db.images import ImageFileError
from annotation_db.label_resolution import dataset_images, labels_per_annotator, resolve_labels
from annotation_db.models import Dataset, Image, Label

SEED_CLASSES = ["正常肾小球", "节段性硬化", "系膜细胞增生", "新月体形成"]


def _import(Session, fmt, path, dataset="d", root=None, annotator="imported", **kw):
    class_names, records = importer.read_records(
        fmt, path, labels_from_subfolders=kw.pop("subfolders", True), exclude=kw.pop("exclude", ())
    )
    root = root or (path if fmt == "folders" else Path(path).parent)
    with Session() as s, s.begin():
        ds = importer.ensure_dataset(s, dataset, class_names=class_names, root=root, multi_label=kw.pop("multi", False))
        return importer.import_records(s, ds, records, annotator=annotator, source=f"import:{fmt}", **kw)


def _export(Session, fmt, out, dataset="d", **kw):
    with Session() as s, s.begin():
        return formats.EXPORTERS[fmt](s, store.get_dataset(s, dataset), out, **kw)


def _labels_by_path(Session, dataset="d", source="majority"):
    with Session() as s, s.begin():
        ds = store.get_dataset(s, dataset)
        by_id = resolve_labels(s, ds, source).by_image
        return {img.path: by_id.get(img.id) for img, _ in dataset_images(s, ds)}


def _labels_by_hash(Session, dataset="d"):
    with Session() as s, s.begin():
        ds = store.get_dataset(s, dataset)
        by_id = resolve_labels(s, ds).by_image
        return {img.sha256: by_id.get(img.id) for img, _ in dataset_images(s, ds)}


def _count(Session, table):
    with Session() as s:
        return s.scalar(select(func.count()).select_from(table))


@pytest.fixture
def seed_dir(tmp_path):
    """Crops and a 4-class file exactly as the original labeling system writes it."""
    root = tmp_path / "seed"
    root.mkdir()
    lines = []
    for i in range(9):
        name = f"0496052bb_{i}.png"
        PILImage.new("RGB", (16, 16), (10 * i, 200, 30)).save(root / name)
        onehot = [0, 0, 0, 0]
        if i != 8:  # the last image is unlabeled: all zeros
            onehot[i % 4] = 1
        obj = {"image_name": name, **dict(zip(SEED_CLASSES, onehot))}
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    (root / "labels.jsonl").write_text("".join(lines), encoding="utf-8")
    return root


def test_seed_jsonl_round_trips_byte_for_byte(SqliteSession, seed_dir, tmp_path):
    src = seed_dir / "labels.jsonl"
    report = _import(SqliteSession, "jsonl", src)
    assert report.images_added == 9 and report.labels_written == 8
    out = tmp_path / "out.jsonl"
    _export(SqliteSession, "jsonl", out)
    assert out.read_bytes() == src.read_bytes()
    assert "正常肾小球" in out.read_text(encoding="utf-8")  # non-ASCII kept, not \\u-escaped
    with SqliteSession() as s:
        ds = store.get_dataset(s, "d")
        assert ds.class_keys == ["normal", "segmental_sclerosis", "mesangial_proliferation", "crescent"]
        assert [c.display_name for c in ds.classes] == SEED_CLASSES


def test_seed_json_array_is_accepted(SqliteSession, seed_dir, tmp_path):
    objs = [json.loads(line) for line in (seed_dir / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    arr = seed_dir / "labels.json"
    arr.write_text(json.dumps(objs, ensure_ascii=False, indent=2), encoding="utf-8")
    _import(SqliteSession, "jsonl", arr)
    out = tmp_path / "out.jsonl"
    _export(SqliteSession, "jsonl", out)
    assert out.read_bytes() == (seed_dir / "labels.jsonl").read_bytes()


def test_bueno_round_trips_through_every_format(Session, bueno_dir, tmp_path):
    """789 real crops: labels.csv -> store -> each format -> a fresh dataset -> same labels."""
    report = _import(Session, "csv", bueno_dir / "labels.csv", dataset="bueno")
    assert (report.images_added, report.labels_written) == (789, 789)
    truth = {}
    with open(bueno_dir / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            truth[row["path"]] = [row["label"]]
    assert _labels_by_path(Session, "bueno") == truth
    with Session() as s:
        n_slides = s.scalar(select(func.count(func.distinct(Image.slide_id))))
    assert n_slides == 24

    for fmt in ("jsonl", "csv", "labelstudio"):
        out = tmp_path / f"bueno.{fmt}"
        _export(Session, fmt, out, dataset="bueno")
        _import(Session, fmt, out, dataset=f"bueno-{fmt}", root=bueno_dir)
        assert _labels_by_path(Session, f"bueno-{fmt}") == truth, fmt
        # and the second export is identical to the first
        again = tmp_path / f"again.{fmt}"
        _export(Session, fmt, again, dataset=f"bueno-{fmt}")
        assert again.read_bytes() == out.read_bytes(), fmt

    folders = tmp_path / "bueno-folders"
    _export(Session, "folders", folders, dataset="bueno", link=True)
    _import(Session, "folders", folders, dataset="bueno-folders")
    assert _labels_by_hash(Session, "bueno-folders") == _labels_by_hash(Session, "bueno")


def test_csv_keeps_slides_and_annotators(SqliteSession, seed_dir, tmp_path):
    f = tmp_path / "l.csv"
    f.write_text(
        "image,label,annotator,slide\n"
        "0496052bb_0.png,正常肾小球,dr_li,S1\n"
        "0496052bb_0.png,crescent,dr_wang,S1\n"
        "0496052bb_1.png,normal,dr_li,\n",
        encoding="utf-8",
    )
    with SqliteSession() as s, s.begin():
        store.create_dataset(s, "d", GLOMERULUS_CLASSES, root=seed_dir)
    _import(SqliteSession, "csv", f, root=seed_dir)
    with SqliteSession() as s:
        ds = store.get_dataset(s, "d")
        votes = labels_per_annotator(s, ds)
        assert sorted(votes.values(), key=len) == [
            {"dr_li": ["normal"]},
            {"dr_li": ["normal"], "dr_wang": ["crescent"]},
        ]
        assert [slide for _, slide in dataset_images(s, ds)] == ["S1", None]


def test_multi_label_csv_and_jsonl(SqliteSession, seed_dir, tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("image,label\n0496052bb_0.png,crescent;segmental_sclerosis\n", encoding="utf-8")
    with SqliteSession() as s, s.begin():
        store.create_dataset(s, "d", GLOMERULUS_CLASSES, root=seed_dir, multi_label=True)
    _import(SqliteSession, "csv", f, root=seed_dir)
    out = tmp_path / "m.jsonl"
    _export(SqliteSession, "jsonl", out, labeled_only=True)
    assert json.loads(out.read_text(encoding="utf-8")) == {
        "image_name": "0496052bb_0.png", "正常肾小球": 0, "节段性硬化": 1, "系膜细胞增生": 0, "新月体形成": 1
    }
    out_csv = tmp_path / "m2.csv"
    _export(SqliteSession, "csv", out_csv)
    assert out_csv.read_text().splitlines()[1] == "0496052bb_0.png,segmental_sclerosis;crescent,"


@pytest.mark.parametrize(
    "line, field, problem",
    [
        ('{"image_name": "0496052bb_1.png", "正常肾小球": 1, "节段性硬化": 0, "系膜细胞增生": 0', None, "invalid JSON"),
        ('{"image_name": "0496052bb_1.png", "正常肾小球": 2, "节段性硬化": 0, "系膜细胞增生": 0, "新月体形成": 0}', "正常肾小球", "0 or 1"),
        ('{"image_name": "0496052bb_1.png", "正常肾小球": 1, "节段性硬化": 0, "系膜细胞增生": 0, "球囊粘连": 0}', "新月体形成", "differ"),
        ('{"正常肾小球": 1, "节段性硬化": 0, "系膜细胞增生": 0, "新月体形成": 0}', "image_name", "missing"),
        ('["0496052bb_1.png"]', None, "expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_line_field(seed_dir, line, field, problem):
    f = seed_dir / "bad.jsonl"
    good = (seed_dir / "labels.jsonl").read_text(encoding="utf-8").splitlines()
    f.write_text("\n".join([good[0], good[1], line, good[3]]) + "\n", encoding="utf-8")
    with pytest.raises(FormatError) as e:
        formats.read_jsonl(f)
    assert e.value.line == 3 and e.value.field == field and e.value.file == str(f)
    assert problem in str(e.value) and f"{f}, line 3" in str(e.value)


def _assert_nothing_stored(Session):
    assert _count(Session, Image) == 0 and _count(Session, Label) == 0


def test_unknown_class_aborts_the_whole_import(SqliteSession, seed_dir, tmp_path):
    with SqliteSession() as s, s.begin():
        store.create_dataset(s, "d", GLOMERULUS_CLASSES, root=seed_dir)
    f = tmp_path / "l.csv"
    f.write_text("image,label\n0496052bb_0.png,normal\n0496052bb_1.png,globally_sclerotic\n")
    with pytest.raises(InvalidLabelError, match=r"l\.csv:3: field 'label': unknown class 'globally_sclerotic'"):
        _import(SqliteSession, "csv", f, root=seed_dir)
    _assert_nothing_stored(SqliteSession)


def test_missing_file_aborts_or_is_skipped_and_reported(Session, seed_dir):
    (seed_dir / "0496052bb_4.png").unlink()
    with pytest.raises(ImageFileError, match=r"labels\.jsonl:5: field 'image': 0496052bb_4\.png not found"):
        _import(Session, "jsonl", seed_dir / "labels.jsonl")
    _assert_nothing_stored(Session)
    with Session() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 0  # the dataset rolled back too
    report = _import(Session, "jsonl", seed_dir / "labels.jsonl", skip_missing=True)
    assert report.images_added == 8 and len(report.missing) == 1 and "labels.jsonl:5" in report.missing[0]


def test_image_outside_root_and_non_image_are_refused(SqliteSession, seed_dir, tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("image,label\n../elsewhere.png,normal\n")
    with SqliteSession() as s, s.begin():
        store.create_dataset(s, "d", GLOMERULUS_CLASSES, root=seed_dir)
    with pytest.raises(ImageFileError, match=r"l\.csv:2: field 'image': .*outside the data root"):
        _import(SqliteSession, "csv", f, root=seed_dir)
    (seed_dir / "fake.png").write_text("hello")
    f.write_text("image,label\n0496052bb_0.png,normal\nfake.png,normal\n")
    with pytest.raises(ImageFileError, match=r"l\.csv:3: .*fake\.png: not an image"):
        _import(SqliteSession, "csv", f, root=seed_dir)
    _assert_nothing_stored(SqliteSession)


def test_folder_import_labels_from_subfolders_and_skips_duplicates(SqliteSession, tmp_path):
    root = tmp_path / "folders"
    for cls, color in [("normal", (200, 0, 0)), ("crescent", (0, 200, 0))]:
        (root / cls).mkdir(parents=True)
        PILImage.new("RGB", (8, 8), color).save(root / cls / "a.png")
        PILImage.new("RGB", (8, 9), color).save(root / cls / "b.jpg")
    (root / "crescent" / "copy_of_a.png").write_bytes((root / "normal" / "a.png").read_bytes())
    (root / "crescent" / "readme.txt").write_text("not an image, ignored")
    (root / "normal" / "_masks").mkdir()
    PILImage.new("L", (8, 8), 255).save(root / "normal" / "_masks" / "a.png")
    report = _import(SqliteSession, "folders", root, skip_duplicates=True, exclude=["_masks"])
    assert report.images_added == 4 and report.duplicates_skipped == 1
    assert report.duplicates == [("crescent/copy_of_a.png", "normal/a.png")] or report.duplicates == [
        ("normal/a.png", "crescent/copy_of_a.png")
    ]
    labels = _labels_by_path(SqliteSession)
    assert labels["normal/b.jpg"] == ["normal"] and labels["crescent/a.png"] == ["crescent"]
    # Re-importing changes nothing and writes no history.
    again = _import(SqliteSession, "folders", root, skip_duplicates=True, exclude=["_masks"])
    assert again.images_added == 0 and again.labels_written == 0 and again.labels_unchanged == 4


def test_label_studio_export_matches_its_config_and_reimports_annotators(SqliteSession, seed_dir, tmp_path):
    _import(SqliteSession, "jsonl", seed_dir / "labels.jsonl")
    out = tmp_path / "ls.json"
    _export(SqliteSession, "labelstudio", out)
    tasks = json.loads(out.read_text(encoding="utf-8"))
    assert len(tasks) == 9 and "annotations" not in tasks[8]
    result = tasks[1]["annotations"][0]["result"][0]
    assert result["type"] == "choices" and result["value"]["choices"] == ["节段性硬化"]
    config = (tmp_path / "ls.json.config.xml").read_text(encoding="utf-8")
    import xml.etree.ElementTree as ET

    view = ET.fromstring(config)
    choices = view.find("Choices")
    assert choices.get("name") == result["from_name"] and choices.get("toName") == result["to_name"]
    assert [c.get("value") for c in choices.findall("Choice")] == SEED_CLASSES
    assert view.find("Image").get("value") == "$image"
    # A task as Label Studio exports it: the annotator in completed_by, image by URL.
    tasks[0]["annotations"][0]["completed_by"] = {"email": "li@hospital.org"}
    del tasks[0]["data"]["glom_path"]
    tasks[0]["annotations"].append({"result": [], "was_cancelled": True})
    out.write_text(json.dumps(tasks, ensure_ascii=False))
    records = formats.read_label_studio(out)
    assert records[0].image == "0496052bb_0.png" and records[0].annotator == "li@hospital.org"
    assert records[0].classes == ["正常肾小球"] and len(records) == 9


def test_exports_choose_whose_labels(SqliteSession, seed_dir, tmp_path):
    with SqliteSession() as s, s.begin():
        ds = store.create_dataset(s, "d", GLOMERULUS_CLASSES, root=seed_dir)
        img = store.add_image(s, ds, "0496052bb_0.png")
        store.set_label(s, img, "a", ["normal"])
        store.set_label(s, img, "b", ["crescent"])
    out = tmp_path / "o.csv"
    assert _export(SqliteSession, "csv", out).undecided == 1
    assert out.read_text().splitlines() == ["image,label,slide"]
    _export(SqliteSession, "csv", out, source="annotator:b")
    assert out.read_text().splitlines()[1] == "0496052bb_0.png,crescent,"
    with SqliteSession() as s, s.begin():
        store.adjudicate(s, store.find_image(s, store.get_dataset(s, "d"), "0496052bb_0.png"), "chief", ["normal"])
    _export(SqliteSession, "csv", out, source="adjudicated")
    assert out.read_text().splitlines()[1] == "0496052bb_0.png,normal,"


def test_class_folder_export_refuses_a_non_empty_target(SqliteSession, seed_dir, tmp_path):
    _import(SqliteSession, "jsonl", seed_dir / "labels.jsonl")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(store.StoreError, match="not empty"):
        _export(SqliteSession, "folders", target)
    assert (target / "keep.txt").read_text() == "mine" and sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # staging cleaned up
