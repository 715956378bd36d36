"""The slide workspace page's server side: which detector checkpoints it offers, and a detector
run started from the page running in the background and reporting how it ended."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from app import workspace_page


def test_only_detector_checkpoints_with_weights_are_offered(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(workspace_page, "REPO", tmp_path)
    runs = tmp_path / "runs"
    for name, kind, weights in [("det", "detector", True), ("cls", None, True), ("half", "detector", False)]:
        (runs / name).mkdir(parents=True)
        (runs / name / "best.json").write_text(json.dumps({"kind": kind} if kind else {"arch": "resnet18"}))
        if weights:
            (runs / name / "best.safetensors").write_bytes(b"x")
    (runs / "det" / "broken.json").write_text("{not json")
    assert workspace_page.detector_checkpoints(runs) == ["runs/det/best"]


def test_a_detector_run_in_the_background_reports_its_failure(tmp_path: Path, wsi_dir: Path):
    slide = wsi_dir / "cmu-1-small-region.svs"
    run = workspace_page.start_detection(slide, str(tmp_path / "missing"), "glom", "alice",
                                         f"sqlite:///{tmp_path / 'none.db'}")
    assert workspace_page.start_detection(slide, "other", "glom", "bo", "sqlite://") is run  # one per slide at a time
    deadline = time.time() + 120
    while run.status()[0] == "running" and time.time() < deadline:
        time.sleep(0.5)
    state, last = run.status()
    assert state == "failed" and last.startswith("error:") and "missing" in last, last
    workspace_page._RUNS.clear()


def test_detector_runs_of_same_named_slides_keep_their_own_folders(tmp_path: Path, wsi_dir: Path):
    """Two slides of one file name in different folders: each run its own log (and GeoJSON copy); a
    new run of a slide clears the folder of its finished earlier run."""
    slides = []
    for case in ("case1", "case2"):
        (tmp_path / case).mkdir()
        slides.append(tmp_path / case / "biopsy.svs")
        slides[-1].symlink_to(wsi_dir / "cmu-1-small-region.svs")
    try:
        runs = [workspace_page.start_detection(sl, str(tmp_path / f"missing-{i}"), "glom", "alice",
                                               f"sqlite:///{tmp_path / 'none.db'}") for i, sl in enumerate(slides)]
        assert runs[0].log_path.parent != runs[1].log_path.parent
        for i, run in enumerate(runs):
            run.proc.wait(120)
            state, last = run.status()
            assert state == "failed" and f"missing-{i}" in last, last  # its own log, not the other's
        again = workspace_page.start_detection(slides[0], str(tmp_path / "missing-0"), "glom", "alice",
                                               f"sqlite:///{tmp_path / 'none.db'}")
        assert again is not runs[0] and not runs[0].log_path.parent.exists() and runs[1].log_path.exists()
        again.proc.wait(120)
    finally:
        for run in workspace_page._RUNS.values():
            if run.proc.poll() is None:
                run.proc.kill()
            shutil.rmtree(run.log_path.parent, ignore_errors=True)
        workspace_page._RUNS.clear()


def test_drawn_boxes_cropped_then_classified_with_the_chosen_checkpoint(tmp_path: Path, wsi_dir: Path, monkeypatch):
    from sqlalchemy import select

    from annotation_db import boxes as box_store
    from annotation_db import store
    from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
    from annotation_db.models import Prediction
    from core.demo import DEMO_CLASSES
    from core.slide_crops import crop_into_dataset
    from tests.demo_checkpoint import demo_checkpoint

    monkeypatch.setattr(workspace_page, "REPO", tmp_path)
    monkeypatch.setattr(workspace_page, "RUNS_DIR", tmp_path / "runs")
    demo_checkpoint(tmp_path / "runs" / "demo" / "best")
    (tmp_path / "runs" / "det").mkdir()
    (tmp_path / "runs" / "det" / "best.json").write_text(json.dumps({"kind": "detector"}))
    (tmp_path / "runs" / "det" / "best.safetensors").write_bytes(b"x")
    assert workspace_page.classifier_checkpoints(tmp_path / "runs") == ["runs/demo/best.safetensors"]

    engine = create_store_engine(f"sqlite:///{tmp_path / 's.db'}")
    upgrade(engine)
    Session = make_sessionmaker(engine)
    slide_path = wsi_dir / "cmu-1-small-region.svs"
    with Session() as s, s.begin():
        store.create_dataset(s, "glom", list(DEMO_CLASSES), root=tmp_path / "ds")
        slide = store.get_or_create_slide(s, "cmu-1-small-region", path=str(slide_path))
        rows = [box_store.add_box(s, slide, b, created_by="ana") for b in [(300, 400, 200, 180), (1000, 1200, 220, 200)]]
        ids = [c.image_id for c in crop_into_dataset(s, "glom", slide_path, rows, annotator="ana").crops]
    assert len(ids) == 2
    assert workspace_page.classify_crops(Session, ids, "runs/demo/best.safetensors") == 2
    with Session() as s:
        preds = s.scalars(select(Prediction).order_by(Prediction.image_id)).all()
        assert [p.image_id for p in preds] == sorted(ids)
        assert all(p.predicted in DEMO_CLASSES and p.checkpoint_id.startswith("demo/best@") for p in preds)
    engine.dispose()


# --- the page through Streamlit's AppTest (the view itself is tested in real Chromium, test_workspace_e2e.py) ---

PAGE = str(Path(__file__).resolve().parents[1] / "app" / "workspace_page.py")
NO_MPP = "tcga-cr-7395-01a-01-ts1.svs"  # its file records no µm/px


@pytest.fixture
def Session(tmp_path: Path, monkeypatch, wsi_dir: Path):
    from annotation_db import store
    from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
    from app import slide_api

    url = f"sqlite:///{tmp_path / 'ws.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    Session = make_sessionmaker(engine)
    with Session() as s, s.begin():
        store.create_dataset(s, "glom", ["globally_sclerotic", "non_globally_sclerotic"], root=tmp_path / "dataset")
        store.get_or_create_annotator(s, "alice")
    monkeypatch.setenv("GLOM_DB", url)
    monkeypatch.setenv("GLOM_SLIDES_DIR", str(wsi_dir))
    monkeypatch.setattr(slide_api, "_service", None)
    yield Session
    engine.dispose()


def _signed_in(Session, script: str = PAGE):
    from sqlalchemy import select
    from streamlit.testing.v1 import AppTest

    from annotation_db.models import Annotator

    with Session() as s:
        alice = s.scalar(select(Annotator).where(Annotator.name == "alice"))
    at = AppTest.from_file(script, default_timeout=60)
    at.session_state["annotator_id"], at.session_state["annotator_name"] = alice.id, "alice"
    at.session_state["dataset_name"] = "glom"
    return at


def _cfg(at) -> dict:
    """The workspace's configuration as embedded in the page's iframe."""
    html = next(el.proto.srcdoc for el in at.get("iframe"))
    return json.loads(html.split("const CFG = ", 1)[1].split(";\n", 1)[0])


def test_a_slide_without_mpp_asks_for_it_before_cropping(Session):
    from sqlalchemy import select

    from annotation_db import boxes as box_store
    from annotation_db import store
    from annotation_db.models import Image, Slide, SlideBox

    at = _signed_in(Session)
    at.run()
    at.selectbox(key="ws_slide").select(NO_MPP).run()
    assert not at.exception, at.exception
    assert any("does not record its µm per pixel" in w.value for w in at.warning)
    assert at.button(key="ws_crop").disabled and _cfg(at)["mpp"] is None  # no scale bar without it
    with Session() as s, s.begin():
        row = store.get_or_create_slide(s, "tcga-cr-7395-01a-01-ts1", path=NO_MPP)
        box_store.add_box(s, row, (1500, 1500, 300, 300), created_by="alice", label="non_globally_sclerotic")
    at.number_input(key=f"ws_mpp_{NO_MPP}").set_value(0.25).run()
    assert not at.exception, at.exception
    assert not any("does not record" in w.value for w in at.warning)
    assert not at.button(key="ws_crop").disabled and _cfg(at)["mpp"] == 0.25  # the scale bar's µm/px
    with Session() as s:  # stored at once: the next visit (or another user) finds it
        assert s.scalar(select(Slide.mpp).where(Slide.name == "tcga-cr-7395-01a-01-ts1")) == 0.25
    at.selectbox(key="ws_stain").select("HE").run()
    at.button(key="ws_crop").click().run()
    assert any("1 glomeruli cropped into glom" in m.value for m in at.success), [e.value for e in at.error]
    with Session() as s:
        image = s.scalar(select(Image))
        assert (image.x0, image.y0, image.box_w, image.box_h) == (1484, 1484, 332, 332)
        assert image.width == 166  # 332 level-0 px at 0.25 µm/px, cut at 0.5 µm/px
        slide = s.get(Slide, image.slide_id)
        assert slide.mpp == 0.25 and slide.stain.value == "HE"
        assert s.scalar(select(SlideBox.image_id)) == image.id

    fresh = _signed_in(Session)  # a new session: the stored µm/px is offered, cropping is open
    fresh.run()
    fresh.selectbox(key="ws_slide").select(NO_MPP).run()
    assert fresh.number_input(key=f"ws_mpp_{NO_MPP}").value == 0.25 and not fresh.button(key="ws_crop").disabled


def test_a_slide_with_mpp_asks_nothing_and_the_pick_survives_another_page(Session):
    at = _signed_in(Session, str(Path(PAGE).with_name("label.py")))
    at.run()
    at.switch_page("workspace_page.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="ws_slide").value == "cmu-1-small-region.svs"  # the first slide
    assert not at.number_input and not any("µm per pixel" in w.value for w in at.warning)
    assert _cfg(at)["mpp"] == pytest.approx(0.499, abs=0.001)
    at.selectbox(key="ws_slide").select(NO_MPP).run()
    at.switch_page("labeling_page.py").run()
    assert "ws_slide" not in at.session_state  # what Streamlit does to a widget's key on another page
    at.switch_page("workspace_page.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="ws_slide").value == NO_MPP


def test_the_page_offers_the_checkpoints_of_glom_runs(tmp_path: Path, monkeypatch):
    """$GLOM_RUNS (the viewer's and the job runner's runs folder) is where the page looks for
    detectors and classifiers; one outside the repository is offered by its full path (what
    `glom detect --checkpoint` and the classifier loader then open), a relative one starts at the
    repository, and without it the repository's runs/ is used."""
    from tests.demo_checkpoint import demo_checkpoint

    runs = tmp_path / "elsewhere"
    (runs / "det").mkdir(parents=True)
    (runs / "det" / "best.json").write_text(json.dumps({"kind": "detector"}))
    (runs / "det" / "best.safetensors").write_bytes(b"x")
    demo_checkpoint(runs / "demo" / "best")
    monkeypatch.setenv("GLOM_RUNS", str(runs))
    assert workspace_page.runs_dir() == runs.resolve()
    assert workspace_page.detector_checkpoints() == [str(runs.resolve() / "det" / "best")]
    assert workspace_page.classifier_checkpoints() == [str(runs.resolve() / "demo" / "best.safetensors")]
    monkeypatch.setenv("GLOM_RUNS", "some/runs")
    assert workspace_page.runs_dir() == workspace_page.REPO / "some" / "runs"
    monkeypatch.delenv("GLOM_RUNS")
    assert workspace_page.runs_dir() == workspace_page.RUNS_DIR == workspace_page.REPO / "runs"
