"""End to end in real Chromium: a pathologist outlines a missed glomerulus in the slide workspace
(the Outline button, a click per vertex, a double-click closes), drops a second one with Escape,
closes a third with Enter and deletes it like a box; the store holds her outline with its level-0
points (where she clicked on the real slide), the view draws it back as an outline after a
reload, and the QuPath GeoJSON export holds it as a Polygon with the detector's proposals.

Same server and slide as tests/test_workspace_e2e.py (the ``server`` fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from annotation_db.db import create_store_engine, make_sessionmaker
from annotation_db.models import SlideBox
from core.annotations import read_geojson
from core.slide_crops import PROPOSED_CLASS
from tests.test_label_e2e import CHROMIUM, CHROMIUM_ARGS
from tests.test_workspace_e2e import IDLE, _state, server, sign_in_to_workspace  # noqa: F401 - the fixture

pytestmark = pytest.mark.browser

PENTAGON = [(-60, -50), (50, -60), (80, 20), (10, 70), (-70, 30)]  # screen px around the view's centre


def _open_workspace(page, *, sign_in: bool):
    """Sign in (``sign_in``, or when a reload ended the Streamlit session) and open the workspace."""
    sign_in_to_workspace(page, sign_in=sign_in or bool(page.get_by_label("Your name").count()))
    frame_el = page.wait_for_selector("iframe[title='st.iframe'], iframe", timeout=30_000)
    frame = frame_el.content_frame()
    frame.wait_for_function("() => window.__glomWorkspace && window.__glomWorkspace.ready"
                            " && window.__glomWorkspace.overlayFetches > 0", timeout=30_000)
    return frame_el, frame


def test_outline_a_glomerulus_find_it_in_the_store_after_reload_and_in_the_export(server, tmp_path: Path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    base, url = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(base)
        frame_el, frame = _open_workspace(page, sign_in=True)
        fb = frame_el.bounding_box()
        cx, cy = fb["width"] / 2, fb["height"] / 2
        clicks = [(cx + dx, cy + dy) for dx, dy in PENTAGON]
        expected = [frame.evaluate(f"() => toImage({x}, {y})") for x, y in clicks]  # level-0, as drawn on screen

        frame.click("#boutline")
        for x, y in clicks[:-1]:
            page.mouse.click(fb["x"] + x, fb["y"] + y)
        assert _state(frame, "outlined") == 0
        page.mouse.dblclick(fb["x"] + clicks[-1][0], fb["y"] + clicks[-1][1])  # the last vertex, and closes
        frame.wait_for_function("() => window.__glomWorkspace.outlined === 1 && window.__glomWorkspace.features"
                                ".some(f => f.properties.layer === 'drawn' && f.properties.outline)", timeout=15_000)

        # a second one dropped with Escape: nothing stored, still outlining
        page.mouse.click(fb["x"] + cx + 150, fb["y"] + cy - 40)
        page.mouse.click(fb["x"] + cx + 200, fb["y"] + cy - 40)
        page.keyboard.press("Escape")
        assert frame.evaluate("() => verts.length") == 0 and frame.evaluate("() => drawing && shape") == "outline"
        # a third closed with Enter, then deleted like a box (Escape leaves outline mode, a click selects)
        for dx, dy in [(150, -40), (220, -30), (190, 40)]:
            page.mouse.click(fb["x"] + cx + dx, fb["y"] + cy + dy)
        page.keyboard.press("Enter")
        frame.wait_for_function("() => window.__glomWorkspace.outlined === 2 && window.__glomWorkspace.counts.drawn === 2",
                                timeout=15_000)
        page.keyboard.press("Escape")
        assert frame.evaluate("() => drawing") is False
        page.mouse.click(fb["x"] + cx + 185, fb["y"] + cy - 20)
        frame.wait_for_function("() => window.__glomWorkspace.selected != null", timeout=10_000)
        page.keyboard.press("Delete")
        frame.wait_for_function("() => window.__glomWorkspace.deleted === 1 && window.__glomWorkspace.counts.drawn === 1",
                                timeout=15_000)

        engine = create_store_engine(url)
        with make_sessionmaker(engine)() as s:
            (row,) = s.scalars(select(SlideBox)).all()
            stored = [list(v) for v in row.polygon]
            assert (row.created_by, row.source, row.label) == ("alice", "drawn", None)
        engine.dispose()
        assert len(stored) == 5
        for (x, y), e in zip(stored, expected, strict=True):  # where she clicked on the slide, to a pixel
            assert abs(x - e["x"]) < 1.5 and abs(y - e["y"]) < 1.5, (stored, expected)
        xs, ys = [v[0] for v in stored], [v[1] for v in stored]
        assert row.box[:2] == (int(min(xs)), int(min(ys)))

        page.reload()
        page.wait_for_selector(IDLE, timeout=30_000)
        frame_el, frame = _open_workspace(page, sign_in=False)
        frame.wait_for_function("() => window.__glomWorkspace.counts.drawn === 1", timeout=30_000)
        ring = frame.evaluate("() => window.__glomWorkspace.features.find(f => f.properties.layer === 'drawn')"
                              ".geometry.coordinates[0]")
        assert ring == [*stored, stored[0]]

        with page.expect_download() as dl:
            page.get_by_role("button", name="QuPath GeoJSON of the glomeruli").click()
        exported = tmp_path / "export.geojson"
        dl.value.save_as(exported)  # the browser's copy goes with it
        features = json.loads(exported.read_text())["features"]
        browser.close()
    anns = read_geojson(exported)
    assert [list(v) for v in anns[0].vertices] == [*stored, stored[0]] and anns[0].kind == "polygon"
    assert [a.label for a in anns[1:]] == [PROPOSED_CLASS] * 3  # nobody decided them yet
    assert all(f["properties"]["objectType"] == "annotation" for f in features)
