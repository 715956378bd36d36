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
