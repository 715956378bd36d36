"""End to end in real Chromium: the slide workspace served by the app's own server (app/asgi.py,
the launcher's entry point). A pathologist signs in, opens the real slide ``cmu-1-small-region.svs``,
sees Deep Zoom tiles load, zooms with the mouse wheel (more tiles, at a finer level), draws a
missed glomerulus with the mouse (stored at once, attributed to her account) and a slip she
selects with a click and deletes with the Delete key, reviews three detector
proposals by keyboard (N, A, A, R, U undo, R), fixes one box by dragging its corner, reloads and finds her box and her decisions; the
store holds them, attributed. Then exports the QuPath GeoJSON, crops the boxes and finds the crops
on the map and in the Label queue. A tile URL without her token is refused.

Then the detector from the page: on a slides folder holding the real ``.svs`` and a pyramidal TIFF
of three real kidney tiles, with ``$GLOM_RUNS`` at the small detector the tests train
(``tiny_detector``), she picks the kidney slide and the detector, presses *Run on this slide*, sees
it running while she zooms, and its proposals appear in the view by themselves; she accepts one
and rejects one by keyboard, and the store holds them with the checkpoint as their source.

Needs Debian's ``chromium`` and the ``playwright`` package (the browser is never downloaded).
Set ``GLOM_UPDATE_SCREENSHOT=1`` to refresh ``docs/slide_workspace.png``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import select

from annotation_db import store
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.models import GlomerulusProposal, SlideBox
from annotation_db.models import Image as ImageRow
from annotation_db.proposals import replace_proposals
from tests.findings import box_finding
from tests.servers import wait_until_healthy
from tests.test_label_e2e import CHROMIUM, CHROMIUM_ARGS, E2E_PASSWORD, _accounts

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SLIDE = "cmu-1-small-region.svs"
SCREENSHOT = REPO / "docs" / "slide_workspace.png"
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
PROPOSALS = [(400, 500, 0.97), (1200, 900, 0.91), (700, 2000, 0.64)]  # level-0 x, y, score




@contextlib.contextmanager
def _serve_app(tmp_path: Path, url: str, slides: Path, **env: str):
    """``streamlit run app/asgi.py`` (the launcher's entry point) on a free port; yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "streamlit"), "run", "app/asgi.py", "--server.port", str(port),
         "--server.headless", "true"],
        cwd=REPO, env=dict(os.environ, GLOM_DB=url, GLOM_SLIDES_DIR=str(slides), GLOM_DATA_ROOT=str(tmp_path), **env),
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(port, proc, tmp_path / "streamlit.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture
def server(tmp_path: Path, wsi_dir: Path):
    url = f"sqlite:///{tmp_path / 'ws.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    with make_sessionmaker(engine)() as s, s.begin():
        store.create_dataset(s, "glom", ["globally_sclerotic", "non_globally_sclerotic"], root=tmp_path / "dataset")
        findings = [box_finding((x, y, 160, 140), score, diamond=True) for x, y, score in PROPOSALS]
        replace_proposals(s, "glom", "cmu-1-small-region", findings, source="model:test.safetensors",
                          slide_path=str(wsi_dir / SLIDE))
    engine.dispose()
    _accounts(url)
    with _serve_app(tmp_path, url, wsi_dir) as base:
        yield base, url


def sign_in_to_workspace(page, *, sign_in: bool = True) -> None:
    """Sign in as alice (``sign_in``) and open the Slide workspace by its link (a page load would sign out)."""
    if sign_in:
        page.get_by_label("Your name").fill("alice")
        page.get_by_label("Password", exact=True).fill(E2E_PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("Signed in as alice").wait_for(timeout=30_000)
    page.get_by_role("link", name="Slide workspace").click()
    page.wait_for_selector(IDLE, timeout=30_000)


def _state(frame, expr: str):
    return frame.evaluate(f"() => window.__glomWorkspace && window.__glomWorkspace.{expr}")


def test_open_zoom_draw_reload(server):
    from playwright.sync_api import sync_playwright

    base, url = server
    with urllib.request.urlopen(base + "/api/slides/vendor/openseadragon.min.js") as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/api/slides/tile/0/0_0.jpeg?slide={SLIDE}")
    assert err.value.code == 403

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(base)
        sign_in_to_workspace(page)
        frame_el = page.wait_for_selector("iframe[title='st.iframe'], iframe", timeout=30_000)
        frame = frame_el.content_frame()
        frame.wait_for_function("() => window.__glomWorkspace && window.__glomWorkspace.ready"
                                " && window.__glomWorkspace.tilesLoaded > 0 && window.__glomWorkspace.overlayFetches > 0",
                                timeout=30_000)
        before = _state(frame, "tilesLoaded")
        zoom0 = frame.evaluate("() => document.getElementById('zoom').textContent")
        box = frame_el.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(4):
            page.mouse.wheel(0, -300)
            page.wait_for_timeout(150)
        frame.wait_for_function(f"() => window.__glomWorkspace.tilesLoaded > {before}", timeout=20_000)
        assert frame.evaluate("() => document.getElementById('zoom').textContent") != zoom0
        assert _state(frame, "tileErrors") == 0
        assert "µm" in frame.evaluate("() => document.getElementById('scaletext').textContent")

        # draw a missed glomerulus
        frame.click("#bdraw")
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 40, cy - 40)
        page.mouse.down()
        page.mouse.move(cx, cy, steps=4)
        page.mouse.move(cx + 40, cy + 40, steps=4)
        page.mouse.up()
        frame.wait_for_function("() => window.__glomWorkspace.drawn === 1 && window.__glomWorkspace.counts.drawn === 1",
                                timeout=15_000)
        # a slip: a second box, selected with a click and removed with the Delete key
        page.mouse.move(cx + 90, cy - 40)
        page.mouse.down()
        page.mouse.move(cx + 150, cy + 20, steps=4)
        page.mouse.up()
        frame.wait_for_function("() => window.__glomWorkspace.drawn === 2 && window.__glomWorkspace.counts.drawn === 2",
                                timeout=15_000)
        frame.click("#bdraw")  # drawing off: a click selects, keys go to the review
        page.mouse.click(cx + 120, cy - 10)
        frame.wait_for_function("() => window.__glomWorkspace.selected != null", timeout=10_000)
        slip = frame.evaluate("() => drawnBox(window.__glomWorkspace.selected).properties.box")
        assert "box #" in frame.evaluate("() => document.getElementById('sel').textContent")
        page.keyboard.press("Delete")
        frame.wait_for_function("() => window.__glomWorkspace.deleted === 1 && window.__glomWorkspace.counts.drawn === 1"
                                " && window.__glomWorkspace.selected === null", timeout=15_000)

        # review: N flies to the best proposal, A A R decides the three (each advances)
        frame.wait_for_function("() => window.__glomWorkspace.proposals.length === 3", timeout=15_000)
        frame.locator("#osd").click(position={"x": 200, "y": 400})
        page.keyboard.press("n")
        frame.wait_for_function("() => window.__glomWorkspace.current === 0", timeout=10_000)
        for i, key in enumerate("aar", start=1):
            page.keyboard.press(key)
            frame.wait_for_function(f"() => window.__glomWorkspace.decisions === {i}", timeout=10_000)
        page.keyboard.press("u")  # undo the rejection, then reject again
        frame.wait_for_function("() => window.__glomWorkspace.undone === 1", timeout=10_000)
        assert frame.evaluate("() => window.__glomWorkspace.proposals.map(p => p.status).join()") == "accepted,accepted,proposed"
        page.keyboard.press("r")
        frame.wait_for_function("() => window.__glomWorkspace.decisions === 4", timeout=10_000)
        assert frame.evaluate("() => viewer.viewport.getRotation(true)") == 0  # the review keys are not OpenSeadragon's

        # fix the second proposal's box (accepted): drag its bottom-right handle 60 px right, 45 px down
        page.keyboard.press("p")
        frame.wait_for_function("() => window.__glomWorkspace.current === 1", timeout=10_000)
        page.wait_for_timeout(1500)  # the view flies there
        corner = frame.evaluate("() => handles(window.__glomWorkspace.proposals[1])[2]")
        k = frame.evaluate("() => imageZoom()")
        fb = frame_el.bounding_box()
        page.mouse.move(fb["x"] + corner["x"], fb["y"] + corner["y"])
        page.mouse.down()
        page.mouse.move(fb["x"] + corner["x"] + 30, fb["y"] + corner["y"] + 20, steps=3)
        page.mouse.move(fb["x"] + corner["x"] + 60, fb["y"] + corner["y"] + 45, steps=3)
        page.mouse.up()
        frame.wait_for_function("() => window.__glomWorkspace.fixes === 1", timeout=10_000)
        fixed = frame.evaluate("() => window.__glomWorkspace.proposals[1].box")
        assert fixed[:2] == [1200, 900] and abs(fixed[2] - (160 + 60 / k)) < 3 and abs(fixed[3] - (140 + 45 / k)) < 3
        # the overlay sits on the tissue: level-0 -> screen -> level-0 is the identity, y grows downwards
        ys = frame.evaluate("() => [0, 1000, 2000].map(y => toScreen(700, y).y)")
        assert ys[0] < ys[1] < ys[2]
        back = frame.evaluate("() => { const s = toScreen(700, 2000); return toImage(s.x, s.y); }")
        assert abs(back["x"] - 700) < 1 and abs(back["y"] - 2000) < 1
        # and agrees with where OpenSeadragon draws that point (viewport units: the image is 1 wide)
        osd = frame.evaluate("() => viewer.viewport.viewportToViewerElementCoordinates("
                             "new OpenSeadragon.Point(700 / 2220, 2000 / 2220), true)")
        mine = frame.evaluate("() => toScreen(700, 2000)")
        assert abs(osd["x"] - mine["x"]) < 1 and abs(osd["y"] - mine["y"]) < 1, (osd, mine)
        if os.environ.get("GLOM_UPDATE_SCREENSHOT") == "1":
            page.screenshot(path=str(SCREENSHOT))

        page.reload()
        page.wait_for_selector(IDLE, timeout=30_000)
        if page.get_by_label("Your name").count():  # the reload ended the Streamlit session
            page.get_by_label("Your name").fill("alice")
            page.get_by_label("Password", exact=True).fill(E2E_PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("link", name="Slide workspace").click()
            page.wait_for_selector(IDLE, timeout=30_000)
        frame = page.wait_for_selector("iframe", timeout=30_000).content_frame()
        frame.wait_for_function("() => window.__glomWorkspace && window.__glomWorkspace.overlayFetches > 0"
                                " && window.__glomWorkspace.counts.drawn === 3"  # mine + two accepted
                                " && window.__glomWorkspace.proposals.length === 3", timeout=30_000)
        assert frame.evaluate("() => window.__glomWorkspace.proposals.map(p => p.status + ':' + p.by).join()") == \
            "accepted:alice,accepted:alice,rejected:alice"

        # the QuPath GeoJSON holds the three boxes; crop them; they are glomeruli on the map and in the Label queue
        with page.expect_download() as dl:
            page.get_by_role("button", name="QuPath GeoJSON of the glomeruli").click()
        assert len(json.loads(Path(dl.value.path()).read_text())["features"]) == 3
        page.get_by_role("button", name="Crop the drawn boxes into glom").click()
        page.get_by_text("3 glomeruli cropped into glom").wait_for(timeout=30_000)
        frame = page.wait_for_selector("iframe", timeout=30_000).content_frame()
        frame.wait_for_function("() => window.__glomWorkspace && window.__glomWorkspace.counts.glomeruli === 3"
                                " && window.__glomWorkspace.counts.drawn === 0", timeout=30_000)
        page.get_by_role("link", name="Label").click()
        page.locator(".st-key-crop img").first.wait_for(timeout=30_000)
        browser.close()

    engine = create_store_engine(url)
    with make_sessionmaker(engine)() as s:
        rows = s.scalars(select(SlideBox).order_by(SlideBox.id)).all()
        assert [r.created_by for r in rows] == ["alice"] * 3
        assert tuple(slip) not in [r.box for r in rows]  # the slip is gone (SQLite may give its id to a later box)
        x, y, w, h = rows[0].box
        props = s.scalars(select(GlomerulusProposal).order_by(GlomerulusProposal.score.desc())).all()
        assert [(p.status, p.reviewed_by) for p in props] == [("accepted", "alice")] * 2 + [("rejected", "alice")]
        assert sorted(r.box for r in rows[1:]) == sorted(p.box for p in props[:2])
        assert len(s.scalars(select(ImageRow).where(ImageRow.slide_id.is_not(None))).all()) == 3
        assert all(r.image_id is not None for r in rows)
        assert props[1].box == tuple(fixed) and props[1].box[2] > 160  # the fixed box, and its accepted box follows
        assert 30 < w < 2220 and 30 < h < 2967 and x >= 0 and y >= 0
    engine.dispose()


# --- the detector run from the page, on a pyramidal TIFF of real kidney tiles -----------------------

KIDNEY = "kidney_three_tiles.tif"


@pytest.fixture
def detector_server(tmp_path: Path, wsi_dir: Path, tiny_detector: Path):
    """The app on a slides folder holding the real ``cmu-1-small-region.svs`` and a 3-level TIFF of
    three real kidney tiles (:func:`tests.detector_fixtures.three_tile_slide`), with ``$GLOM_RUNS``
    at the folder of the detector the tests train (``tiny_detector``), and no proposal yet."""
    import shutil

    from tests.detector_fixtures import three_tile_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(wsi_dir / SLIDE, slides / SLIDE)  # a link would lead out of the slides folder: refused
    three_tile_slide(slides / KIDNEY)
    url = f"sqlite:///{tmp_path / 'ws.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    with make_sessionmaker(engine)() as s, s.begin():
        store.create_dataset(s, "glom", ["globally_sclerotic", "non_globally_sclerotic"], root=tmp_path / "dataset")
    engine.dispose()
    _accounts(url)
    runs = tiny_detector.parent.parent  # <runs>/<run>/best.safetensors, as `glom train-detector` leaves it
    with _serve_app(tmp_path, url, slides, GLOM_RUNS=str(runs)) as base:
        yield base, url, tiny_detector


def _workspace_frame(page, slide: str):
    """The workspace view's frame once it shows ``slide`` and has drawn its first tiles."""
    frame = page.wait_for_selector("iframe", timeout=30_000).content_frame()
    frame.wait_for_function(f"() => typeof CFG !== 'undefined' && CFG.slide === {json.dumps(slide)}"
                            " && window.__glomWorkspace && window.__glomWorkspace.ready"
                            " && window.__glomWorkspace.tilesLoaded > 0", timeout=30_000)
    return frame


def test_run_the_detector_from_the_page_then_review_its_proposals(detector_server):
    """A pathologist picks the kidney slide, picks the detector (a checkpoint under $GLOM_RUNS),
    presses the page's run button, sees it running while the view stays usable, and the detector's
    proposals appear in the view without a reload; she accepts the best and rejects the next by
    keyboard; the store holds them, attributed, with the checkpoint as their source."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import sync_playwright

    from annotation_db.models import Slide

    base, url, checkpoint = detector_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(base)
        sign_in_to_workspace(page)
        _workspace_frame(page, SLIDE)  # the .svs first, as the folder lists them
        page.get_by_label("Slide", exact=True).click()
        page.get_by_role("option", name=KIDNEY).click()
        page.wait_for_selector(IDLE, timeout=30_000)
        frame = _workspace_frame(page, KIDNEY)
        assert _state(frame, "proposals.length") == 0 and _state(frame, "tileErrors") == 0
        assert "No proposals" in frame.evaluate("() => document.getElementById('review').textContent")

        page.get_by_text("Find glomeruli with the detector").click()
        best = str(checkpoint.with_suffix(""))  # outside the repository: offered by its full path
        picker = page.get_by_label("Detector checkpoint")
        picker.scroll_into_view_if_needed()
        option = page.get_by_role("option", name=best, exact=True)
        for attempt in range(4):  # a list the page closes (a rerun) before it shows or under the click: again
            page.wait_for_selector(IDLE, timeout=30_000)
            picker.click()
            page.keyboard.press("ArrowDown")  # the list opens (every option a checkpoint of $GLOM_RUNS)
            try:
                option.wait_for(timeout=10_000)
                assert all(o.startswith(str(checkpoint.parent.parent))
                           for o in page.get_by_role("option").all_inner_texts())
                option.click(timeout=5_000)
                break
            except PlaywrightTimeoutError:
                page.keyboard.press("Escape")
                if attempt == 3:
                    raise
        page.wait_for_selector(IDLE, timeout=30_000)
        page.get_by_role("button", name="Run on this slide").click()
        page.get_by_text("Detector running on this slide").wait_for(timeout=30_000)  # progress, on the page
        frame = _workspace_frame(page, KIDNEY)
        # the view stays usable while it runs (a wheel zoom loads more tiles), and the proposals
        # appear in it by themselves (the view re-reads them every 5 s)
        before, zoom0 = _state(frame, "tilesLoaded"), frame.evaluate("() => document.getElementById('zoom').textContent")
        box = page.locator("iframe").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(3):
            page.mouse.wheel(0, -300)
            page.wait_for_timeout(150)
        frame.wait_for_function(f"() => window.__glomWorkspace.tilesLoaded > {before}", timeout=30_000)
        assert frame.evaluate("() => document.getElementById('zoom').textContent") != zoom0
        frame.wait_for_function("() => window.__glomWorkspace.proposals.length >= 2", timeout=150_000)
        page.get_by_text("Detector finished").wait_for(timeout=30_000)
        frame.wait_for_function("() => window.__glomWorkspace.features.some(f => f.properties.layer === 'proposals')",
                                timeout=15_000)
        found = frame.evaluate("() => window.__glomWorkspace.proposals")
        assert {p["status"] for p in found} == {"proposed"}
        assert [p["score"] for p in found] == sorted((p["score"] for p in found), reverse=True)

        frame.locator("#osd").click(position={"x": 200, "y": 400})
        page.keyboard.press("n")
        frame.wait_for_function("() => window.__glomWorkspace.current === 0", timeout=10_000)
        page.keyboard.press("a")
        frame.wait_for_function("() => window.__glomWorkspace.decisions === 1", timeout=15_000)
        page.keyboard.press("r")
        frame.wait_for_function("() => window.__glomWorkspace.decisions === 2", timeout=15_000)
        assert frame.evaluate("() => window.__glomWorkspace.proposals.slice(0, 2).map(p => p.status + ':' + p.by)"
                              ".join()") == "accepted:alice,rejected:alice"
        browser.close()

    engine = create_store_engine(url)
    with make_sessionmaker(engine)() as s:
        slide = s.scalar(select(Slide).where(Slide.name == "kidney_three_tiles"))
        props = s.scalars(select(GlomerulusProposal).where(GlomerulusProposal.slide_id == slide.id)
                          .order_by(GlomerulusProposal.score.desc())).all()
        assert len(props) == len(found) >= 2
        assert [(p.status, p.reviewed_by) for p in props[:2]] == [("accepted", "alice"), ("rejected", "alice")]
        assert all(p.status == "proposed" for p in props[2:])
        assert all(p.source.startswith("model:") and "best" in p.source for p in props), [p.source for p in props]
        # the acceptance drew a box over the proposal, attributed; nothing on the other slide
        rows = s.scalars(select(SlideBox)).all()
        assert [(r.box, r.created_by, r.slide_id) for r in rows] == [(props[0].box, "alice", slide.id)]
        assert s.scalar(select(GlomerulusProposal).where(GlomerulusProposal.slide_id != slide.id)) is None
    engine.dispose()
