"""End to end in real Chromium: a pathologist opens the Slides page, picks the real slide
``cmu-1-small-region.svs``, draws two boxes with the mouse, crops them into the dataset and finds
the crops in the labeling queue; the store holds two images with their slide and level-0 box.

Needs Debian's ``chromium`` and the ``playwright`` package (the browser is never downloaded).
Set ``GLOM_UPDATE_SCREENSHOT=1`` to refresh ``docs/slides_page.png``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import select

from annotation_db import store
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.models import Image, Label, Slide, SlideBox
from tests.test_label_e2e import CHROMIUM, CHROMIUM_ARGS, E2E_PASSWORD, app_url  # noqa: F401 - app_url is a fixture

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SLIDE = "cmu-1-small-region.svs"
CLASSES = ["globally_sclerotic", "non_globally_sclerotic"]
SCREENSHOT = REPO / "docs" / "slides_page.png"


@pytest.fixture
def store_url(tmp_path: Path, wsi_dir: Path, monkeypatch) -> str:
    """An empty dataset whose root is a temp folder: the crops are written there."""
    monkeypatch.setenv("GLOM_SLIDES_DIR", str(wsi_dir))  # read by the server app_url starts
    url = f"sqlite:///{tmp_path / 'slides.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    (tmp_path / "dataset").mkdir()
    with make_sessionmaker(engine)() as s, s.begin():
        store.create_dataset(s, "glom", CLASSES, root=tmp_path / "dataset")
    engine.dispose()
    return url


def _sign_in(page, base: str, name: str) -> None:
    # test_label_e2e's _sign_in waits for a crop; this dataset starts empty.
    page.goto(base)
    page.get_by_label("Your name").fill(name)
    page.get_by_label("Password", exact=True).fill(E2E_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text(f"Signed in as {name}").wait_for(timeout=30_000)


def _drag(page, x0: float, y0: float, x1: float, y1: float) -> None:
    """A mouse drag on the region view, in fractions of its width and height."""
    # A widget change just before (a class picked) reruns the page and rebuilds the plot: wait for
    # the rerun to end, then for a drag area that is on the page and has a box.
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=30_000)
    area = page.locator(".st-key-slides_canvas .nsewdrag").first
    b = None
    for _ in range(50):
        area.wait_for(timeout=15_000)
        b = area.bounding_box()
        if b is not None:
            break
        page.wait_for_timeout(100)
    assert b is not None, "the region view's drag area never settled"
    page.mouse.move(b["x"] + x0 * b["width"], b["y"] + y0 * b["height"])
    page.mouse.down()
    page.mouse.move(b["x"] + x1 * b["width"], b["y"] + y1 * b["height"], steps=12)
    page.mouse.up()


def test_draw_two_boxes_crop_them_and_label_the_crops(app_url, store_url, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        _sign_in(page, app_url, "alice")
        page.get_by_role("link", name="Slides").click()
        page.locator(".st-key-slides_file").click()
        page.get_by_role("option", name=SLIDE).click()
        page.get_by_text("0 drawn, 0 not cropped yet").wait_for(timeout=30_000)

        # The whole slide is shown first (1:8); one step in (1:4) it fills the view's height.
        page.locator(".st-key-slides_zoom_in button").first.click()
        page.get_by_text("Zoom 1:4").wait_for(timeout=15_000)
        # The second box gets a class: it is cropped labelled.
        _drag(page, 0.30, 0.30, 0.42, 0.45)
        page.get_by_text("1 drawn, 1 not cropped yet").wait_for(timeout=15_000)
        page.locator(".st-key-slides_label").click()
        page.get_by_role("option", name="globally_sclerotic", exact=True).click()
        _drag(page, 0.45, 0.55, 0.58, 0.70)
        page.get_by_text("2 drawn, 2 not cropped yet").wait_for(timeout=15_000)

        with page.expect_download() as download:
            page.get_by_role("button", name="QuPath GeoJSON").click()
        geojson = download.value.path().read_text()

        page.get_by_role("button", name="Crop 2 boxes into glom").click()
        page.get_by_text("2 crops added to glom").wait_for(timeout=30_000)
        page.get_by_text("2 drawn, 0 not cropped yet").wait_for(timeout=15_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(tmp_path / "slides.png"), full_page=True)

        page.get_by_role("link", name="Label").click()
        caption = page.locator(".st-key-crop_caption")
        try:
            caption.wait_for(timeout=30_000)
        except Exception:
            page.screenshot(path=str(tmp_path / "label_page.png"), full_page=True)
            pytest.fail(f"no crop on the Label page; it shows:\n{page.locator('body').inner_text()[:2000]}")
        first = caption.inner_text()
        browser.close()

    if os.environ.get("GLOM_UPDATE_SCREENSHOT"):
        SCREENSHOT.write_bytes((tmp_path / "slides.png").read_bytes())

    assert geojson.count('"Feature"') == 2 and "globally_sclerotic" in geojson
    assert "cmu-1-small-region" in first, f"the queue shows no crop of the slide: {first!r}"
    engine = create_store_engine(store_url)
    with make_sessionmaker(engine)() as s:
        images = s.execute(
            select(Image.path, Image.width, Image.height, Image.x0, Image.y0, Image.box_w, Image.box_h, Slide.name)
            .join(Slide, Slide.id == Image.slide_id)
        ).all()
        drawn = s.execute(select(SlideBox.x0, SlideBox.y0, SlideBox.box_w, SlideBox.box_h, SlideBox.label,
                                 SlideBox.image_id, SlideBox.created_by).order_by(SlideBox.id)).all()
        labels = s.execute(select(Label.image_id, Label.classes)).all()
    engine.dispose()
    assert len(images) == 2 and {i.name for i in images} == {"cmu-1-small-region"}
    assert [d.label for d in drawn] == [None, "globally_sclerotic"]
    assert all(d.image_id is not None and d.created_by == "alice" for d in drawn)
    for d in drawn:  # ~12% x 15% of an 800x600 view at 1:4: about 400 level-0 px a side
        assert 300 < d.box_w < 600 and 300 < d.box_h < 600, d
    # The image records the padded level-0 box (16 px each side) around what was drawn.
    boxes = sorted((i.x0, i.y0, i.box_w, i.box_h) for i in images)
    assert boxes == sorted((d.x0 - 16, d.y0 - 16, d.box_w + 32, d.box_h + 32) for d in drawn)
    for i in images:
        assert (tmp_path / "dataset" / i.path).is_file() and i.path.startswith("wsi/")
    labelled = dict(labels)
    assert list(labelled.values()) == [["globally_sclerotic"]]
