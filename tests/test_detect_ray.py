"""``glom detect --ray``: one task per slide on a real Ray cluster started on loopback.

A head and a second node (``ray start``, one CPU each: two workers, ``tests/ray_local.py``), the
tiny real-tile detector and pyramidal TIFFs built from the real tiles (``tests/conftest.py``,
``tests/detector_fixtures.py``). The tests that need Ray are skipped only where ray is not
importable; it is in requirements.txt, so CI runs them. The cluster (``ray_address``, tests/conftest.py)
is started once per session and shared with tests/test_classify_slides.py.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from core.cli import main as glom
from tests.detector_fixtures import (
    SLIDE_TILES,
    TILES_MPP,
    real_tile,
    write_pyramid_tiff,
)
from tests.ray_local import free_port


def _slides(test_slide, root: Path) -> list[Path]:
    """Three small slides: the session's three-tile slide twice under other names, and its tiles in reverse order."""
    path, _ = test_slide
    root.mkdir()
    a, c = shutil.copy(path, root / "slide_a.tif"), shutil.copy(path, root / "slide_c.tif")
    tiles = [real_tile(n)[0] for n in reversed(SLIDE_TILES)]
    rgb = np.full((1024 + 512, 3 * 1024, 3), 243, np.uint8)
    rgb[:1024] = np.concatenate(tiles, axis=1)
    b = write_pyramid_tiff(root / "slide_b.tif", rgb, TILES_MPP)
    return [Path(a), b, Path(c)]


def test_detect_on_ray_matches_the_local_run_stores_proposals_and_resumes(
        ray_address: str, tiny_detector: Path, test_slide, store_url: str, tmp_path: Path, capsys) -> None:
    from annotation_db import store
    from annotation_db.db import open_store
    from annotation_db.proposals import list_proposals

    slides = _slides(test_slide, tmp_path / "slides")
    Session = open_store(store_url)
    with Session() as s, s.begin():
        store.get_or_create_dataset(s, "biopsies", ["globally_sclerotic", "non_globally_sclerotic"],
                                    root=tmp_path / "ds")
    common = ["--checkpoint", str(tiny_detector), "--threads", "1", "--no-progress"]
    assert glom(["detect", *map(str, slides), "--out", str(tmp_path / "local"), *common]) == 0
    capsys.readouterr()

    missing = tmp_path / "slides" / "not_there.tif"
    ray_args = ["detect", *map(str, slides), "--out", str(tmp_path / "ray"), "--ray", ray_address,
                "--db", store_url, "--dataset", "biopsies", *common]
    rc = glom(ray_args[:4] + [str(missing)] + ray_args[4:])
    out, err = capsys.readouterr()
    # the missing slide is named, with the node that could not see it; the others finish
    assert rc == 1, err
    assert re.search(r"error: .*not_there\.tif: file not found .*\[on Ray node \S+ [0-9a-f]{8}\]", err), err
    assert "1 of 4 slides failed" in err
    nodes = {}
    for slide in slides:
        line = next(ln for ln in out.splitlines() if ln.startswith(str(slide)))
        nodes[slide.name] = re.search(r"\[(\S+ [0-9a-f]{8})\]$", line).group(1)
        local = json.loads((tmp_path / "local" / f"{slide.stem}.geojson").read_text())
        on_ray = json.loads((tmp_path / "ray" / f"{slide.stem}.geojson").read_text())
        assert on_ray["features"] == local["features"] and len(local["features"]) >= 2, slide.name
        assert on_ray["glomlab"]["checkpoint_sha256"] == local["glomlab"]["checkpoint_sha256"]
        with Session() as s:  # stored from inside the task
            props = list_proposals(s, slide.stem, "biopsies")
            assert len(props) == len(local["features"]) and {p.status for p in props} == {"proposed"}
            assert {p.source for p in props} == {"model:best"} and props[0].slide.path == str(slide.resolve())
    assert len(set(nodes.values())) == 2, f"the tasks ran on one node only: {nodes}"
    assert not (tmp_path / "ray" / "not_there.geojson").exists()

    # a second run settles every slide on the driver: nothing is detected again, nothing submitted
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir()}
    assert glom(ray_args) == 0
    out = capsys.readouterr().out
    assert out.count("(already done)") == 3 and out.count("[driver]") == 3, out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir()} == before
    with Session() as s:
        assert len(list_proposals(s, "slide_b", "biopsies")) == len(
            json.loads((tmp_path / "ray" / "slide_b.geojson").read_text())["features"])


def test_a_task_checks_for_a_finished_result_itself(ray_address: str, tiny_detector: Path, test_slide,
                                                    tmp_path: Path) -> None:
    """A slide finished after the driver looked (another run, another driver) is not detected again."""

    from core.detection.cluster import connect, run_on_ray
    from core.detection.model import read_detector_meta
    from core.detection.slide_job import DetectJob, detect_and_store
    from core.detection.slides import DetectSettings, checkpoint_digest

    path, _ = test_slide
    stem = tiny_detector.with_suffix("")
    job = DetectJob(weights=str(tiny_detector), checkpoint=str(stem), digest=checkpoint_digest(stem),
                    settings=DetectSettings.from_meta(read_detector_meta(stem)), out_dir=str(tmp_path / "o"),
                    source="model:best", threads=1)
    first = detect_and_store(str(path), job)  # in this process: the result exists before any task starts
    assert not first.skipped
    with connect(ray_address):
        (result,) = run_on_ray(detect_and_store, [str(path)], args=(job,))
    assert result.error is None, result.error
    assert result.value.skipped and result.value.n == first.n and re.fullmatch(r"\S+ [0-9a-f]{8}", result.node)
    assert result.value.out == first.out


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def test_ctrl_c_cancels_the_tasks_still_running(ray_address: str) -> None:
    """After Ctrl-C the cluster is free at once: the running and pending tasks were cancelled, not left to finish."""
    import signal
    import time

    from core.detection.cluster import connect, run_on_ray

    def nap(item: str) -> str:  # pickled by value: the workers need not import this test
        time.sleep(float(item))
        return item

    with connect(ray_address):
        old = signal.signal(signal.SIGALRM, _interrupt)
        signal.setitimer(signal.ITIMER_REAL, 6)  # Ctrl-C while both CPUs hold a 300 s nap and one waits
        try:
            with pytest.raises(KeyboardInterrupt):
                for _ in run_on_ray(nap, ["300", "300", "300"]):
                    pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        t0 = time.monotonic()
        (result,) = run_on_ray(nap, ["0"])
        assert result.value == "0" and time.monotonic() - t0 < 120


def test_an_unreachable_cluster_is_named(tiny_detector: Path, test_slide, tmp_path: Path, capsys) -> None:
    pytest.importorskip("ray")
    path, _ = test_slide
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    rc = glom(["detect", str(path), "--checkpoint", str(tiny_detector), "--out", str(tmp_path / "o"),
               "--ray", address, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot reach the Ray cluster at {address}" in err
    rc = glom(["detect", str(path), "--checkpoint", str(tiny_detector), "--out", str(tmp_path / "o"),
               "--ray", address, "--workers", "2", "--no-progress"])
    assert rc == 2 and "--workers" in capsys.readouterr().err


def test_without_ray_the_error_says_what_to_install(tiny_detector: Path, test_slide, tmp_path: Path, monkeypatch,
                                                    capsys) -> None:
    path, _ = test_slide
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    rc = glom(["detect", str(path), "--checkpoint", str(tiny_detector), "--out", str(tmp_path / "o"),
               "--ray", "127.0.0.1:6379", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--ray needs the ray package" in err and "pip install ray==2.60.0" in err
