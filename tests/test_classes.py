"""Label text → class key: one rule for ``glom import``, ``glom extract`` and the viewer's slides.

The same annotation file (boxes on a real slide, classes written by key or display name in any
case) goes through the three paths; each gives the same class keys, and a class that is none of
the schema's gets the same refusal from the two importing paths (the viewer shows it as
unannotated and counts it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from annotation_db import store
from annotation_db.classes import ClassKeys, ClassSpec, UnknownClassError, schema_for
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.label_resolution import labeled_items
from annotation_db.models import Image as ImageRow
from core.annotations import Annotation, write_geojson
from core.cli import main as glom
from core.slide_crops import slide_annotations
from core.viewer_store import crop_slide_for_viewer

CMU = "cmu-1-small-region.svs"
SCHEMA = [ClassSpec("normal", "Normal"), ClassSpec("segmental_sclerosis", "Segmental sclerosis"),
          ClassSpec("crescent", "Crescent")]
# (level-0 box on the slide, the class as a person typed it, the key it names)
BOXES = [((100, 200, 300, 260), "crescent", "crescent"),  # key
         ((900, 1200, 280, 240), "NORMAL", "normal"),  # key, other case
         ((1500, 400, 300, 300), "segmental SCLEROSIS", "segmental_sclerosis"),  # display name, mixed case
         ((300, 1900, 260, 260), " Crescent ", "crescent")]  # display name, spaces around
UNKNOWN = ((1200, 1600, 250, 250), "Glomerulus")


def _csv(path: Path, rows: list[tuple[tuple[int, int, int, int], str]]) -> Path:
    """One file both readers take: ``glom import`` reads image,label; ``glom extract`` and the
    viewer read slide,x,y,w,h,label."""
    lines = ["image,slide,x,y,w,h,label"]
    for i, ((x, y, w, h), label) in enumerate(rows):
        lines.append(f"crops/{i}.png,{CMU},{x},{y},{w},{h},{label}")
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(path.parent / "crops" / f"{i}.png")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    with make_sessionmaker(engine).begin() as s:
        store.create_dataset(s, "imported", SCHEMA, root=tmp_path)  # the CSV's image paths are relative to it
        store.create_dataset(s, "extracted", SCHEMA, root=tmp_path / "extracted")
    engine.dispose()
    return url


def _keys_in(url: str, dataset: str) -> list[str]:
    engine = create_store_engine(url)
    try:
        with make_sessionmaker(engine)() as s:
            ds = store.get_dataset(s, dataset)
            items = {i.image_id: i.classes for i in labeled_items(s, dataset)}
            ids = s.scalars(select(ImageRow.id).where(ImageRow.dataset_id == ds.id).order_by(ImageRow.id)).all()
            return [items[i][0] for i in ids]
    finally:
        engine.dispose()


def test_one_annotation_file_gives_the_same_classes_through_import_extract_and_the_viewer(
    tmp_path: Path, wsi_dir: Path, store_url: str, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "crops").mkdir()
    bad = _csv(tmp_path / "with_unknown.csv", [(b, t) for b, t, _ in BOXES] + [UNKNOWN])
    wanted = [k for _, _, k in BOXES]

    # A class that is none of the schema's: both importing paths refuse the file, with one message.
    assert glom(["import", "csv", str(bad), "--dataset", "imported", "--db", store_url]) == 2
    import_err = capsys.readouterr().err
    assert glom(["extract", str(wsi_dir / CMU), "--annotations", str(bad), "--out", str(tmp_path / "extracted"),
                 "--mpp", "0.5", "--pad", "16", "--dataset", "extracted", "--db", store_url, "--no-progress"]) == 2
    extract_err = capsys.readouterr().err
    for err, dataset in ((import_err, "imported"), (extract_err, "extracted")):
        [line] = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("error:")]  # not progress bars
        assert line.startswith(f"error: {bad}:6: "), line
        assert line[line.index("unknown class"):] == (
            f"unknown class 'Glomerulus' for dataset {dataset!r} (its classes: normal (Normal), "
            "segmental_sclerosis (Segmental sclerosis), crescent (Crescent))")
    assert _keys_in(store_url, "imported") == _keys_in(store_url, "extracted") == []  # nothing half-written
    assert not list((tmp_path / "extracted").rglob("*.png"))

    # The viewer is not an importer: it cuts every box and shows the unknown class as unannotated.
    engine = create_store_engine(store_url)
    try:
        with make_sessionmaker(engine).begin() as s:
            anns, _ = slide_annotations(s, wsi_dir / CMU, bad)
            cut = crop_slide_for_viewer(s, wsi_dir / CMU, anns, [c.key for c in SCHEMA],
                                        {c.key: c.display_name for c in SCHEMA}, tmp_path / "data")
            assert [c.label for c in cut.crops] == [*wanted, None]
            assert cut.ignored_labels == {"Glomerulus": 1}
    finally:
        engine.dispose()

    # Without it, the three paths give the same keys, in the file's order.
    good = _csv(tmp_path / "known.csv", [(b, t) for b, t, _ in BOXES])
    assert glom(["import", "csv", str(good), "--dataset", "imported", "--db", store_url]) == 0
    assert glom(["extract", str(wsi_dir / CMU), "--annotations", str(good), "--out", str(tmp_path / "extracted"),
                 "--mpp", "0.5", "--pad", "16", "--dataset", "extracted", "--db", store_url, "--no-progress"]) == 0
    assert _keys_in(store_url, "imported") == _keys_in(store_url, "extracted") == wanted
    # A QuPath GeoJSON of the same boxes and classes (QuPath's "classification") reads the same.
    geo = write_geojson([Annotation.rectangle(*b, t) for b, t, _ in BOXES], tmp_path / "known.geojson")
    assert [f["properties"]["classification"]["name"] for f in json.loads(geo.read_text())["features"]] == [
        t for _, t, _ in BOXES]
    engine = create_store_engine(store_url)
    try:
        with make_sessionmaker(engine).begin() as s:
            for ann_file in (good, geo):
                anns, _ = slide_annotations(s, wsi_dir / CMU, ann_file)
                cut = crop_slide_for_viewer(s, wsi_dir / CMU, anns, [c.key for c in SCHEMA],
                                            {c.key: c.display_name for c in SCHEMA}, tmp_path / "data")
                assert [c.label for c in cut.crops] == wanted and cut.ignored_labels == {}
    finally:
        engine.dispose()


def test_exact_matches_win_and_unknown_names_are_refused() -> None:
    # Keys that differ only in case each resolve to themselves; the folded match is the fallback.
    keys = ClassKeys([ClassSpec("A", "upper"), ClassSpec("a", "lower")], "dataset 'x'")
    assert [keys.get(t) for t in ("A", "a", "UPPER", "Lower", " a ")] == ["A", "a", "A", "a", "a"]
    # A display name never shadows another class's key.
    keys = ClassKeys([ClassSpec("normal", "crescent"), ClassSpec("crescent", "Crescent")], "dataset 'x'")
    assert keys.get("crescent") == "crescent"
    assert keys.get(None) is None and keys.get("") is None
    with pytest.raises(UnknownClassError, match=r"^f\.csv:3: unknown class 'nope' for dataset 'x'") as e:
        keys.key("nope", where="f.csv:3")
    assert e.value.label == "nope"


def test_schema_for_a_new_dataset_uses_the_same_rule() -> None:
    glom_classes = schema_for(["CRESCENT", "新月体形成", "Normal"])
    assert [c.key for c in glom_classes] == ["crescent", "normal"]
    assert [(c.key, c.display_name) for c in schema_for(["Fibrotic", "fibrotic", "Other"])] == [
        ("Fibrotic", "Fibrotic"), ("Other", "Other")]
