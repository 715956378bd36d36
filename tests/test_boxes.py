"""Glomeruli marked on slides with their outline (SQLite and PostgreSQL): a polygon is checked and
stored with its bounds as the box, accepting a proposal keeps its outline on the box it draws,
fixing a box by its corners scales the outline into it, and migration 0010 gives the boxes an
earlier acceptance drew their proposal's outline."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from shapely.geometry import Polygon

from annotation_db import db, store
from annotation_db.boxes import BoxError, add_box, list_boxes, move_box
from annotation_db.models import SlideBox
from annotation_db.proposals import accept_proposal, list_proposals, replace_proposals
from app.slide_api import decide
from tests.findings import box_finding

HEXAGON = [[100, 50], [160, 60], [190, 120], [160, 180], [100, 190], [70, 120]]


def test_an_outline_is_stored_with_its_bounds_as_the_box(Session) -> None:
    with Session() as s, s.begin():
        slide = store.get_or_create_slide(s, "s1")
        row = add_box(s, slide, None, polygon=HEXAGON + [HEXAGON[0]], created_by="dr_a", label="x")
        plain = add_box(s, slide, (10, 10, 30, 20), created_by="dr_a")
    with Session() as s:
        got = {b.id: b for b in list_boxes(s, store.get_or_create_slide(s, "s1"))}
        assert got[row.id].polygon == HEXAGON  # the closing vertex is not stored twice
        assert got[row.id].box == (70, 50, 120, 140) and got[row.id].source == "drawn"
        assert got[plain.id].polygon is None and got[plain.id].box == (10, 10, 30, 20)


@pytest.mark.parametrize(("polygon", "says"), [
    ([[0, 0], [10, 0]], "at least 3 distinct points"),
    ([[0, 0], [10, 0], [10, 0], [0, 0]], "at least 3 distinct points"),
    ([[0, 0], [10, 10], [10, 0], [0, 10]], "no simple polygon (Self-intersection"),
    ([[0, 0], [10, 0], [20, 0]], "no simple polygon"),
    ([[0, 0], [10, float("nan")], [0, 10]], "point 1 is not finite"),
    ([[0, 0], ["a", 3], [0, 10]], "point 1 is not [x, y] numbers"),
    ("0,0 1,1 2,0", "a list of [x, y] points"),
])
def test_a_bad_outline_is_refused_naming_the_slide_and_the_fault(Session, polygon, says) -> None:
    with Session() as s, s.begin():
        slide = store.get_or_create_slide(s, "biopsy-7")
        with pytest.raises(BoxError, match="slide biopsy-7") as err:
            add_box(s, slide, None, polygon=polygon, created_by="dr_a")
        assert says in str(err.value)
        with pytest.raises(BoxError, match="is not the bounds"):
            add_box(s, slide, (0, 0, 10, 10), polygon=HEXAGON, created_by="dr_a")
        with pytest.raises(BoxError, match="source is drawn, proposal or import"):
            add_box(s, slide, (0, 0, 10, 10), created_by="dr_a", source="import:")
        assert list_boxes(s, slide) == []


def test_accepting_a_proposal_keeps_its_outline_and_a_fix_scales_it(Session, tmp_path: Path) -> None:
    with Session() as s, s.begin():
        store.get_or_create_dataset(s, "biopsies", ["a", "b"], root=tmp_path)
        replace_proposals(s, "biopsies", "s1", [box_finding((400, 500, 160, 140), 0.9, diamond=True)],
                          source="model:det")
    with Session() as s, s.begin():
        (p,) = list_proposals(s, "s1")
        box = accept_proposal(s, p.id, reviewed_by="dr_a")
        assert box.source == "proposal" and box.box == (400, 500, 160, 140)
        assert box.polygon == [[480, 500], [560, 570], [480, 640], [400, 570]]
        # the corners dragged: the outline is scaled into the new box, on the proposal and on its box
        decide(s, "s1", p.id, "fix", "dr_b", box=[400, 500, 320, 70])
    with Session() as s:
        (p,) = list_proposals(s, "s1")
        assert p.box == p.slide_box.box == (400, 500, 320, 70)
        assert p.slide_box.polygon == p.polygon == [[560, 500], [720, 535], [560, 570], [400, 535]]
        assert Polygon(p.slide_box.polygon).bounds == (400, 500, 720, 570)


def test_move_box_scales_the_outline(Session) -> None:
    with Session() as s, s.begin():
        slide = store.get_or_create_slide(s, "s1")
        row = add_box(s, slide, None, polygon=[[0, 0], [100, 0], [50, 100]], created_by="dr_a")
        move_box(row, (10, 20, 50, 200))
        assert row.box == (10, 20, 50, 200) and row.polygon == [[10, 20], [60, 20], [35, 220]]
        with pytest.raises(BoxError, match="empty box"):
            move_box(row, (10, 20, 0, 200))
        plain = add_box(s, slide, (0, 0, 5, 5), created_by="dr_a")
        assert move_box(plain, (1, 1, 6, 6)).polygon is None


def test_migration_0010_gives_an_accepted_box_its_proposals_outline(sqlite_url: str) -> None:
    engine = db.create_store_engine(sqlite_url)
    db.upgrade(engine, "0009")
    with db.make_sessionmaker(engine)() as s, s.begin():  # slide and dataset tables are as at head
        store.get_or_create_slide(s, "s1")
        store.create_dataset(s, "d", ["a", "b"])
    with engine.begin() as c:
        for i in (1, 2):
            c.execute(sa.text("INSERT INTO slide_box (id, slide_id, x0, y0, box_w, box_h, created_by, created_at) "
                              "VALUES (:i, 1, 0, 0, 10, 10, 'dr_a', CURRENT_TIMESTAMP)"), {"i": i})
        c.execute(sa.text("INSERT INTO glomerulus_proposal (slide_id, dataset_id, status, source, checkpoint_sha256, "
                          "score, polygon, x0, y0, box_w, box_h, created_at, slide_box_id) VALUES (1, 1, 'accepted', "
                          "'model:m', '', 0.9, '[[5, 0], [10, 5], [5, 10], [0, 5], [5, 0]]', 0, 0, 10, 10, "
                          "CURRENT_TIMESTAMP, 1)"))
    db.upgrade(engine)
    with db.make_sessionmaker(engine)() as s:
        accepted, drawn = s.get(SlideBox, 1), s.get(SlideBox, 2)
        assert accepted.polygon == [[5, 0], [10, 5], [5, 10], [0, 5]] and accepted.source == "proposal"
        assert drawn.polygon is None and drawn.source == "drawn"
    engine.dispose()


def test_a_proposal_with_a_crossed_outline_is_accepted_as_its_box_alone(Session, tmp_path: Path) -> None:
    from core.detection.instances import Instance

    bow_tie = [(0, 0), (100, 110), (110, 0), (0, 100)]
    with Session() as s, s.begin():
        store.get_or_create_dataset(s, "biopsies", ["a", "b"], root=tmp_path)
        replace_proposals(s, "biopsies", "s1", [Instance(bow_tie, (0, 0, 110, 110), 5000.0, 0.9)], source="model:old")
        (p,) = list_proposals(s, "s1")
        box = accept_proposal(s, p.id, reviewed_by="dr_a")
        assert (box.box, box.polygon, box.source, p.status) == ((0, 0, 110, 110), None, "proposal", "accepted")
