"""The Slides page through Streamlit's AppTest (what needs no mouse) and its view arithmetic.
Drawing with the mouse is tested in real Chromium in ``test_slides_e2e.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from annotation_db import boxes as box_store
from annotation_db import store
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.models import Annotator, Image, Slide, SlideBox
from app.slides_page import fit_zoom, selection_to_boxes, zoom_step
from core.slide_view import render_view
from core.wsi import NumpySlideReader, list_slide_files

PAGE = str(Path(__file__).resolve().parents[1] / "app" / "slides_page.py")


def test_a_drag_on_the_view_becomes_a_level0_box_clipped_to_the_slide():
    slide = NumpySlideReader(np.zeros((3000, 2000, 3), np.uint8), mpp=0.5)
    view = render_view(slide, (1000, 1500), 4, (800, 600))  # shows level-0 (0, 300) .. (3200, 2700)
    assert view.box[:2] == (0, 300)
    boxes, dropped = selection_to_boxes(
        [{"x": [200, 100], "y": [50, 150]},  # dragged right to left
         {"x": [450, 700], "y": [10, 40]},  # crosses the slide's right edge at x = 2000
         {"x": [10, 13], "y": [10, 13]},  # a slip of the mouse
         {"x": [600, 700], "y": [100, 200]}],  # wholly right of the slide
        view, slide.dimensions,
    )
    assert boxes == [(400, 500, 400, 400), (1800, 340, 200, 120)]
    assert dropped == 2


def test_zoom_steps_stop_at_full_resolution_and_at_the_whole_slide():
    dims = (2220, 2967)
    assert fit_zoom(dims) == 8
    assert zoom_step(8, 1, dims) == 8 and zoom_step(8, -1, dims) == 4 and zoom_step(1, -1, dims) == 1


def test_the_folder_lists_only_files_openslide_opens(wsi_dir):
    assert list_slide_files(wsi_dir) == ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"]


@pytest.fixture
def Session(tmp_path, monkeypatch, wsi_dir):  # noqa: N802
    url = f"sqlite:///{tmp_path / 'slides.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    (tmp_path / "dataset").mkdir()
    Session = make_sessionmaker(engine)
    with Session() as s, s.begin():
        store.create_dataset(s, "glom", ["globally_sclerotic", "non_globally_sclerotic"], root=tmp_path / "dataset")
        store.get_or_create_annotator(s, "alice")
    monkeypatch.setenv("GLOM_DB", url)
    monkeypatch.setenv("GLOM_SLIDES_DIR", str(wsi_dir))
    yield Session
    engine.dispose()


def _page(Session, slide: str) -> AppTest:  # noqa: N803
    with Session() as s:
        alice = s.scalar(select(Annotator).where(Annotator.name == "alice"))
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["annotator_id"], at.session_state["annotator_name"] = alice.id, "alice"
    at.session_state["dataset_name"] = "glom"
    at.run()
    at.selectbox(key="slides_file").select(slide).run()
    assert not at.exception, at.exception
    return at


def _crop_button(at: AppTest):
    return at.button(key="slides_crop")


def test_a_slide_without_mpp_asks_for_it_before_cropping(Session):  # noqa: N803
    at = _page(Session, "tcga-cr-7395-01a-01-ts1.svs")
    assert any("does not record its µm per pixel" in w.value for w in at.warning)
    with Session() as s, s.begin():
        row = s.scalar(select(Slide).where(Slide.name == "tcga-cr-7395-01a-01-ts1"))
        assert row is not None and row.mpp is None  # registered when shown
        box_store.add_box(s, row, (1500, 1500, 300, 300), created_by="alice", label="non_globally_sclerotic")
    at.run()
    assert _crop_button(at).label == "Crop 1 box into glom" and _crop_button(at).disabled
    at.number_input(key="slides_mpp").set_value(0.25).run()
    assert not _crop_button(at).disabled
    _crop_button(at).click().run()
    assert any("1 crops added to glom" in m.value for m in at.success), [e.value for e in at.error]
    with Session() as s:
        image = s.scalar(select(Image))
        assert (image.x0, image.y0, image.box_w, image.box_h) == (1484, 1484, 332, 332)
        assert image.width == 166  # 332 level-0 px at 0.25 µm/px, cut at 0.5 µm/px
        assert s.scalar(select(Slide.mpp).where(Slide.id == image.slide_id)) == 0.25
        assert s.scalar(select(SlideBox.image_id)) == image.id


def test_delete_removes_a_box_and_the_zoom_buttons_move_the_view(Session):  # noqa: N803
    at = _page(Session, "cmu-1-small-region.svs")
    with Session() as s, s.begin():
        row = s.scalar(select(Slide).where(Slide.name == "cmu-1-small-region"))
        keep = box_store.add_box(s, row, (100, 100, 200, 200), created_by="alice").id
        gone = box_store.add_box(s, row, (900, 900, 200, 200), created_by="alice").id
    at.run()
    assert any("2 drawn, 2 not cropped yet" in m.value for m in at.markdown)
    at.button(key=f"slides_del_{gone}").click().run()
    with Session() as s:
        assert s.scalars(select(SlideBox.id)).all() == [keep]
    assert any("Zoom 1:8" in c.value for c in at.caption)
    at.button(key="slides_zoom_in").click().run()
    assert any("Zoom 1:4" in c.value for c in at.caption)
    assert at.session_state["slides_view"][2] == 4


def test_the_picked_slide_survives_a_visit_to_another_page(Session):  # noqa: N803
    """Streamlit drops a widget's state when another page runs; the page keeps the pick itself."""
    with Session() as s:
        alice = s.scalar(select(Annotator).where(Annotator.name == "alice"))
    at = AppTest.from_file(str(Path(PAGE).with_name("label.py")), default_timeout=60)
    at.session_state["annotator_id"], at.session_state["annotator_name"] = alice.id, "alice"
    at.session_state["dataset_name"] = "glom"
    at.run()
    at.switch_page("slides_page.py").run()
    at.selectbox(key="slides_file").select("cmu-1-small-region.svs").run()
    assert not at.exception, at.exception
    at.switch_page("labeling_page.py").run()
    assert "slides_file" not in at.session_state  # what Streamlit does to widget keys
    at.switch_page("slides_page.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="slides_file").value == "cmu-1-small-region.svs"
    assert at.session_state["slides_view"][0].endswith("cmu-1-small-region.svs")
