"""The slide workspace page's server side: which detector checkpoints it offers, and a detector
run started from the page running in the background and reporting how it ended."""

from __future__ import annotations

import json
import time
from pathlib import Path

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
