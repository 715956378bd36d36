"""Glomerulus outlines between annotation files, the store and QuPath (SQLite and PostgreSQL):
``glom extract --dataset`` stores each outline of a QuPath GeoJSON / Aperio XML as a box of its
real slide (with its crop, once however often it runs), refuses a crossed outline naming the file
and feature, and the workspace's GeoJSON export gives the outlines, the still-proposed findings
and nothing rejected, read back the same by the QuPath reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from annotation_db import store
from annotation_db.boxes import add_box, list_boxes
from annotation_db.db import create_store_engine, make_sessionmaker
from annotation_db.models import Image, SlideBox
from annotation_db.proposals import (
    accept_proposal,
    list_proposals,
    reject_proposal,
    replace_proposals,
)
from core.annotations import read_annotations, read_geojson
from core.cli import main as glom
from core.slide_crops import PROPOSED_CLASS, export_boxes_geojson
from tests.findings import box_finding

CMU = "cmu-1-small-region.svs"  # 2220 × 2967 px
OUTLINE_A = [[400, 300], [520, 320], [560, 420], [500, 520], [390, 480], [360, 380]]
OUTLINE_B = [[1200, 1500], [1330, 1480], [1360, 1610], [1240, 1660]]


def _feature(geometry: dict, name: str | None = None) -> dict:
    props = {"objectType": "annotation"}
    if name:
        props["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _polygon(ring: list[list[float]]) -> dict:
    return {"type": "Polygon", "coordinates": [ring + [ring[0]]]}


def _qupath_file(path: Path, *, crossed: bool = False) -> Path:
    features = [
        _feature(_polygon(OUTLINE_A), "crescent"),
        _feature(_polygon(OUTLINE_B)),
        _feature(_polygon([[1600, 900], [1700, 900], [1700, 980], [1600, 980]]), "normal"),  # a rectangle
        _feature({"type": "Point", "coordinates": [900, 2000]}),  # no extent: a crop, no box
    ]
    if crossed:  # a bow tie: the outline crosses itself
        features.insert(2, _feature(_polygon([[100, 100], [300, 320], [310, 100], [90, 300]])))
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _boxes(url: str) -> tuple[list[tuple], int]:
    """Every slide box as (id, box, polygon, label, source, by, its crop's corner, its crop's slide), and the crops."""
    engine = create_store_engine(url)
    try:
        with make_sessionmaker(engine)() as s:
            rows = [(r.id, r.box, r.polygon, r.label, r.source, r.created_by,
                     r.image and (r.image.x0, r.image.y0), r.image and r.image.slide.name)
                    for r in s.scalars(select(SlideBox).order_by(SlideBox.id))]
            return rows, s.scalar(select(func.count()).select_from(Image))
    finally:
        engine.dispose()


def _extract(url: str, slide: Path, ann: Path, out: Path) -> int:
    return glom(["extract", str(slide), "--annotations", str(ann), "--out", str(out), "--mpp", "0.5", "--pad", "16",
                 "--dataset", "biopsies", "--classes", "normal,crescent", "--db", url, "--annotator", "dr_q",
                 "--point-size", "200", "--no-progress"])


def test_extract_stores_each_outline_as_a_box_of_its_slide_once(tmp_path: Path, wsi_dir: Path, store_url: str,
                                                                capsys: pytest.CaptureFixture) -> None:
    ann = _qupath_file(tmp_path / "cmu-1-small-region.geojson")
    out = tmp_path / "crops"
    assert _extract(store_url, wsi_dir / CMU, ann, out) == 0
    rows, n_images = _boxes(store_url)
    assert n_images == 4  # the point is cropped too
    where = "import:cmu-1-small-region.geojson"
    assert [r[1:6] for r in rows] == [
        ((360, 300, 200, 220), OUTLINE_A, "crescent", where, "dr_q"),
        ((1200, 1480, 160, 180), OUTLINE_B, None, where, "dr_q"),
        ((1600, 900, 100, 80), None, "normal", where, "dr_q"),
    ]
    # each box is its crop's: cut around the outline's bounds with the margin
    assert [r[6:] for r in rows] == [((344, 284), "cmu-1-small-region"), ((1184, 1464), "cmu-1-small-region"),
                                     ((1584, 884), "cmu-1-small-region")]

    assert _extract(store_url, wsi_dir / CMU, ann, out) == 0  # again: no box twice, no crop twice
    assert _boxes(store_url) == (rows, 4)

    # Aperio ImageScope XML: a free-hand region is an outline too
    xml = tmp_path / "scope.xml"
    verts = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in [[700, 1000], [820, 1010], [800, 1120], [690, 1100]])
    xml.write_text(f'<Annotations><Annotation Id="1" Name="normal"><Regions><Region Id="1" Type="0"><Vertices>'
                   f'{verts}</Vertices></Region></Regions></Annotation></Annotations>')
    assert _extract(store_url, wsi_dir / CMU, xml, out) == 0
    rows, _ = _boxes(store_url)
    assert rows[-1][2:5] == (
        [[700, 1000], [820, 1010], [800, 1120], [690, 1100]], "normal", "import:scope.xml")
    capsys.readouterr()


def test_a_crossed_outline_stops_the_import_naming_file_and_feature(tmp_path: Path, wsi_dir: Path, store_url: str,
                                                                   Session, capsys: pytest.CaptureFixture) -> None:
    # (Session: the store exists and is migrated, so "nothing stored" is a real look)
    ann = _qupath_file(tmp_path / "outlines.geojson", crossed=True)
    assert _extract(store_url, wsi_dir / CMU, ann, tmp_path / "crops") == 2
    err = capsys.readouterr().err
    assert "error: outlines.geojson: feature 2: the outline is no simple polygon (Self-intersection" in err
    assert not list((tmp_path / "crops").rglob("*.png"))  # nothing cut, nothing stored
    assert _boxes(store_url) == ([], 0)


def test_geojson_export_gives_outlines_and_proposals_and_reads_back_the_same(Session, tmp_path: Path) -> None:
    with Session() as s, s.begin():
        ds = store.get_or_create_dataset(s, "biopsies", ["normal", "crescent"], root=tmp_path)
        slide = store.get_or_create_slide(s, "s1")
        add_box(s, slide, None, polygon=OUTLINE_A, created_by="dr_a", label="crescent")
        add_box(s, slide, (10, 20, 30, 40), created_by="dr_a")
        replace_proposals(s, ds, "s1", [box_finding((1000, 1000, 100, 80), 0.95, diamond=True),
                                        box_finding((2000, 1000, 60, 60), 0.9),
                                        box_finding((3000, 1000, 50, 50), 0.8, diamond=True)], source="model:det")
        accepted, rejected, _ = list_proposals(s, "s1")
        accept_proposal(s, accepted.id, reviewed_by="dr_a", label="normal")
        reject_proposal(s, rejected.id, reviewed_by="dr_a")
        exported = export_boxes_geojson(s, slide, ds)
    path = tmp_path / "s1.geojson"
    path.write_text(json.dumps(exported))
    got = read_geojson(path)
    outline = [[float(x), float(y)] for x, y in got[0].vertices[:-1]]  # QuPath rings are closed
    assert outline == OUTLINE_A and got[0].label == "crescent" and got[0].kind == "polygon"
    assert got[1].kind == "rectangle" and got[1].bounds == (10, 20, 40, 60) and got[1].label is None
    # the accepted proposal once, as its box with the outline and the reviewer's class
    assert got[2].label == "normal" and [list(v) for v in got[2].vertices[:-1]] == \
        [[1050, 1000], [1100, 1040], [1050, 1080], [1000, 1040]]
    # the still-proposed one with its class, score and outline; the rejected one is not there
    assert len(got) == 4 and got[3].label == PROPOSED_CLASS and got[3].bounds == (3000, 1000, 3050, 1050)
    props = [f["properties"] for f in exported["features"]]
    assert all(p["objectType"] == "annotation" for p in props)
    assert props[3]["measurements"] == {"score": 0.8} and props[3]["classification"]["color"] == [255, 152, 0]
    assert [p.get("source") for p in props] == ["drawn", "drawn", "proposal", "model:det"]
    # and what QuPath reads is what `glom extract` imports: the same outlines, once
    with Session() as s, s.begin():
        slide = store.get_or_create_slide(s, "s2")
        from core.slide_crops import store_outlines

        anns = [a for a in read_annotations(path) if a.label != PROPOSED_CLASS]
        assert store_outlines(s, slide, [(a, None) for a in anns], created_by="dr_b") == 3
        assert store_outlines(s, slide, [(a, None) for a in anns], created_by="dr_b") == 0
        assert [b.polygon for b in list_boxes(s, slide)] == [
            OUTLINE_A, None, [[1050, 1000], [1100, 1040], [1050, 1080], [1000, 1040]]]


def test_an_outline_is_cropped_around_its_bounds_and_shown_on_its_glomerulus(SqliteSession, tmp_path: Path,
                                                                           wsi_dir: Path) -> None:
    from app.slide_api import overlay_features
    from core.extract import CropSettings
    from core.slide_crops import crop_into_dataset

    with SqliteSession() as s, s.begin():
        store.create_dataset(s, "glom", ["normal", "crescent"], root=tmp_path / "ds")
        slide = store.get_or_create_slide(s, "cmu-1-small-region", path=str(wsi_dir / CMU))
        row = add_box(s, slide, None, polygon=OUTLINE_A, created_by="dr_a")
        (crop,) = crop_into_dataset(s, "glom", wsi_dir / CMU, [row], annotator="dr_a", settings=CropSettings()).crops
        assert crop.box == row.box == (360, 300, 200, 220) and row.image_id == crop.image_id
    with SqliteSession() as s:
        body = overlay_features(s, CMU, (0, 0, 1000, 1000))
    (f,) = body["features"]  # the cropped outline shows as its glomerulus, with its outline
    assert f["properties"]["layer"] == "glomeruli" and f["properties"]["outline"]
    assert f["geometry"]["coordinates"] == [[*OUTLINE_A, OUTLINE_A[0]]]
