"""In real Chromium: a clinician opens the viewer, uploads a real PAS crop from
../shared/data/glomeruli-bueno, and sees the probabilities and the heatmap beside the original;
then records a disagreement; then cuts and predicts the annotated glomeruli of a real slide.
Saves ``docs/viewer.png``, ``docs/viewer_batch.png`` and ``docs/viewer_slide.png``.

Needs Debian's ``chromium`` (``apt-get install chromium``) and the ``playwright`` package; the
browser is never downloaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import select

from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.models import Annotator, Dataset, Image, Label, Prediction, Slide
from annotation_db.store import add_image, create_dataset, get_or_create_slide
from core.annotations import Annotation, write_geojson
from tests.demo_checkpoint import balanced_bueno, train_checkpoint
from tests.viewer_server import running_viewer

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
CLASSES = ["globally_sclerotic", "non_globally_sclerotic"]
# The screenshots under docs/ are refreshed only when asked (GLOM_UPDATE_SCREENSHOT=1), so a test
# run leaves the checkout as it found it.
SCREENSHOT = (REPO / "docs" if os.environ.get("GLOM_UPDATE_SCREENSHOT") else Path(tempfile.gettempdir())) / "viewer.png"


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, bueno_dir, wsi_dir):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: `apt-get install chromium` (Debian's build; never `playwright install`)")
    root = tmp_path_factory.mktemp("e2e")
    paths, labels, slides = balanced_bueno(bueno_dir, 40, seed=0)
    train_checkpoint(paths, labels, CLASSES, root / "runs" / "bueno-pas" / "best", epochs=6,
                     display_names=["Globally sclerotic", "Not globally sclerotic"], temperature=1.3)
    url = f"sqlite:///{root / 'store.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    with make_sessionmaker(engine).begin() as s:  # 8 real crops from two slides, for the store batch
        ds = create_dataset(s, "bueno", CLASSES, root=bueno_dir)
        picked = [i for i, sl in enumerate(slides) if sl in sorted(set(slides))[:2]][:8]
        for i in picked:
            add_image(s, ds, paths[i], slide=get_or_create_slide(s, slides[i]))
    try:
        with running_viewer(root, root / "runs", url, slides=wsi_dir, extra=("--single-user",),
                            env_extra={"GLOM_LOCAL_USER": "dr_e2e"}) as (base, _proc):
            yield {"url": base, "Session": make_sessionmaker(engine), "paths": paths, "labels": labels}
    finally:
        engine.dispose()


def test_clinician_uploads_a_real_crop_and_sees_the_heatmap(viewer, bueno_dir):
    from playwright.sync_api import expect, sync_playwright

    crop = next(p for p, lab in zip(viewer["paths"], viewer["labels"]) if lab == "globally_sclerotic")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(viewer["url"])
        expect(page.get_by_label("Checkpoint (runs folder)")).to_have_value("bueno-pas/best.safetensors",
                                                                           timeout=60_000)
        expect(page.get_by_text("test_resnet").first).to_be_visible(timeout=60_000)  # checkpoint info shown

        page.locator("#crop-input input[type=file]").set_input_files(str(crop))
        expect(page.locator("#result")).to_contain_text("Predicted:", timeout=60_000)
        expect(page.locator("#result")).to_contain_text("calibrated (temperature 1.30)")
        expect(page.locator("#result")).to_contain_text("Grad-CAM")
        heat = page.locator("#heatmap img")
        expect(heat).to_be_visible(timeout=30_000)
        box = heat.bounding_box()
        assert box and box["width"] > 100 and box["height"] > 100
        expect(page.locator("#probs")).to_contain_text("sclerotic")

        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        # "I disagree": the clinician names the other class.
        predicted = page.locator("#result strong").first.inner_text()
        other = "Not globally sclerotic" if predicted.startswith("Globally") else "Globally sclerotic"
        page.get_by_text("I disagree").click()
        page.get_by_label("The right class is").click()
        page.get_by_role("option", name=other).click()
        page.get_by_role("button", name="Record my label").click()
        expect(page.get_by_text("disagreement queue")).to_be_visible(timeout=30_000)

        # Batch from the store: gallery most uncertain first, per-slide counts; a click opens a crop.
        page.get_by_role("tab", name="Batch").click()
        expect(page.get_by_label("…or a dataset from the store")).to_have_value("bueno", timeout=30_000)
        page.get_by_role("button", name="Predict store crops").click()
        expect(page.get_by_text("decision support", exact=False).first).to_be_visible(timeout=60_000)
        expect(page.locator("#gallery img").first).to_be_visible(timeout=30_000)
        assert page.locator("#gallery img").count() >= 4
        page.screenshot(path=str(SCREENSHOT.with_name("viewer_batch.png")), full_page=True)
        page.locator("#gallery img").first.click()
        expect(page.get_by_role("tab", name="Crop")).to_have_attribute("aria-selected", "true", timeout=30_000)
        page.get_by_role("button", name="Analyse crop").click()
        expect(page.locator("#result")).to_contain_text("Predicted:", timeout=60_000)
        browser.close()
    with viewer["Session"]() as s:
        names = set(s.scalars(select(Annotator.name).join(Label, Label.annotator_id == Annotator.id)))
        n_predictions = len(s.scalars(select(Prediction.id)).all())
    assert "dr_e2e" in names and any(n.startswith("model:bueno-pas/best@") for n in names)
    assert n_predictions >= 1 + 8  # the upload, the store batch (and the reopened crop)


def test_clinician_runs_a_whole_slide_with_its_annotations(viewer, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    boxes = [(1150, 1950, 300, 260), (1540, 2640, 300, 280), (1000, 1100, 300, 260), (1100, 1500, 280, 240)]  # on tissue
    ann = write_geojson([Annotation.rectangle(*b, "Glomerulus") for b in boxes],
                        tmp_path / "cmu-1-small-region.geojson")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(viewer["url"])
        expect(page.get_by_label("Checkpoint (runs folder)")).to_have_value("bueno-pas/best.safetensors",
                                                                           timeout=60_000)
        page.get_by_role("tab", name="Batch").click()
        expect(page.locator("#wsi input")).to_have_value("cmu-1-small-region.svs", timeout=30_000)
        page.locator("#wsi-annotations input[type=file]").set_input_files(str(ann))
        expect(page.locator("#wsi-annotations")).to_contain_text("cmu-1-small-region.geojson", timeout=30_000)
        page.locator("#wsi-run").click()
        expect(page.get_by_text("4 glomeruli from 4 annotations").first).to_be_visible(timeout=90_000)
        expect(page.locator("#gallery img").first).to_be_visible(timeout=30_000)
        assert page.locator("#gallery img").count() == 4
        expect(page.get_by_text("Glomerulus ×4").first).to_be_visible()  # not a class of this checkpoint
        page.screenshot(path=str(SCREENSHOT.with_name("viewer_slide.png")), full_page=True)
        page.locator("#gallery img").first.click()  # a slide crop opens like any other
        expect(page.get_by_role("tab", name="Crop")).to_have_attribute("aria-selected", "true", timeout=30_000)
        page.get_by_role("button", name="Analyse crop").click()
        expect(page.locator("#result")).to_contain_text("Predicted:", timeout=60_000)
        browser.close()
    with viewer["Session"]() as s:
        rows = s.execute(select(Image.x0, Image.y0, Slide.name).join(Slide, Slide.id == Image.slide_id)
                         .join(Dataset, Dataset.id == Image.dataset_id).where(Dataset.name.like("viewer-slides%"))
                         .order_by(Image.x0)).all()
    assert [tuple(r) for r in rows] == [(984, 1084, "cmu-1-small-region"), (1084, 1484, "cmu-1-small-region"),
                                        (1134, 1934, "cmu-1-small-region"), (1524, 2624, "cmu-1-small-region")]
