"""``glom classify-slides``: each slide's stored glomeruli cropped into a dataset and classified, resumably.

The slide is the session's pyramidal TIFF of three real kidney tiles (tests/conftest.py ``test_slide``);
its glomeruli are stored as boxes, the bounds of the real masks' components. The classifier is the
shared tiny demo checkpoint (tests/demo_checkpoint.py). Stores: a real SQLite file, and PostgreSQL
when GLOM_TEST_PG is set. The Ray run uses the session's two-node loopback cluster (``ray_address``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sqlalchemy import func, select

from core.cli import main as glom


def _glomeruli(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Level-0 (x, y, w, h) of each glomerulus of the real masks (components of a few thousand px or more)."""
    lab, _ = ndimage.label(mask)
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if (lab[sl] == i).sum() >= 2000:
            out.append((sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start))
    return out


@pytest.fixture
def setup(test_slide, store_url: str, tmp_path: Path):
    """The store with dataset ``glom`` (the demo classes) and the classifier; a function storing a slide's boxes."""
    from annotation_db import boxes as box_store
    from annotation_db import store
    from annotation_db.db import open_store
    from core.demo import DEMO_CLASSES
    from tests.demo_checkpoint import demo_checkpoint

    path, mask = test_slide
    boxes = _glomeruli(mask)
    assert len(boxes) >= 3, boxes
    Session = open_store(store_url)
    with Session() as s, s.begin():
        store.create_dataset(s, "glom", list(DEMO_CLASSES), root=tmp_path / "ds")
    _, ckpt = demo_checkpoint(tmp_path / "runs" / "demo" / "best")

    def slide(name: str, with_boxes=boxes) -> Path:
        copy = Path(shutil.copy(path, tmp_path / f"{name}.tif"))
        with Session() as s, s.begin():
            row = store.get_or_create_slide(s, name, path=str(copy))
            for b in with_boxes:
                box_store.add_box(s, row, b, created_by="ana")
        return copy

    return Session, ckpt, slide, boxes


def _predictions(Session, slide: str) -> dict[tuple[int, int, int, int], tuple[str, dict[str, float]]]:
    """The slide's crops in dataset glom by level-0 box: (predicted class, probabilities)."""
    from annotation_db.models import Image, Prediction, Slide, SlideBox

    with Session() as s:
        rows = s.execute(select(SlideBox.x0, SlideBox.y0, SlideBox.box_w, SlideBox.box_h, Prediction.predicted, Prediction.probs)
                         .join(Slide, Slide.id == SlideBox.slide_id).join(Image, Image.id == SlideBox.image_id)
                         .join(Prediction, Prediction.image_id == Image.id).where(Slide.name == slide)).all()
    return {tuple(r[:4]): (r[4], r[5]) for r in rows}


def _count(Session, model) -> int:
    with Session() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_crops_classifies_stores_and_a_second_run_does_nothing(setup, store_url: str, tmp_path: Path, capsys):
    from annotation_db.models import Image, Prediction, SlideBox

    Session, ckpt, slide, boxes = setup
    path = slide("biopsy_1")
    args = ["classify-slides", str(path), "--dataset", "glom", "--checkpoint", str(ckpt), "--db", store_url,
            "--no-progress"]
    assert glom(args) == 0
    out = capsys.readouterr().out
    n = len(boxes)
    assert f"biopsy_1: {n} cropped into 'glom', {n} predicted; {n} glomeruli:" in out, out
    preds = _predictions(Session, "biopsy_1")
    assert sorted(preds) == sorted(boxes)  # every box cropped, linked to its crop, predicted
    from annotation_db.images import image_abspath

    with Session() as s:
        assert all(re.fullmatch(r"demo/best@[0-9a-f]{12}", p.checkpoint_id) for p in s.scalars(select(Prediction)))
        files = [image_abspath(img.dataset, img) for img in s.scalars(select(Image))]
    assert len(files) == n and all(f.is_file() and f.is_relative_to(tmp_path / "ds") for f in files), files
    counts = re.search(r"glomeruli: (.*)$", out.strip()).group(1)
    expected = {}
    for cls, _ in preds.values():
        expected[cls] = expected.get(cls, 0) + 1
    assert counts == ", ".join(f"{k} {v}" for k, v in sorted(expected.items()))

    # a second run crops nothing and predicts nothing; the counts are the same
    assert glom(args) == 0
    again = capsys.readouterr().out
    assert f"biopsy_1: 0 cropped into 'glom', 0 predicted; {n} glomeruli: {counts}" in again, again
    assert _count(Session, Image) == n and _count(Session, Prediction) == n

    # a glomerulus drawn since: only it is cropped and predicted (by the slide's name, the store has its file)
    from annotation_db import boxes as box_store
    from annotation_db import store

    with Session() as s, s.begin():
        box_store.add_box(s, store.get_or_create_slide(s, "biopsy_1"), (1500, 1100, 200, 200), created_by="ana")
    assert glom(["classify-slides", "biopsy_1", *args[2:]]) == 0
    assert f"biopsy_1: 1 cropped into 'glom', 1 predicted; {n + 1} glomeruli" in capsys.readouterr().out
    assert _count(Session, Prediction) == n + 1
    with Session() as s:
        assert all(b.image_id for b in s.scalars(select(SlideBox)))


def test_failing_slides_are_named_and_the_others_finish_in_worker_processes(setup, store_url: str, tmp_path: Path, capsys):
    from annotation_db.models import Prediction

    Session, ckpt, slide, boxes = setup
    good, gone = slide("biopsy_ok"), slide("biopsy_gone")
    gone.unlink()
    stranger = tmp_path / "never_stored.tif"
    shutil.copy(good, stranger)
    rc = glom(["classify-slides", str(gone), str(stranger), str(good), "--dataset", "glom", "--checkpoint", str(ckpt),
               "--db", store_url, "--workers", "2", "--threads", "1", "--no-progress"])  # local worker processes
    out, err = capsys.readouterr()
    assert rc == 1
    assert re.search(r"error: \S*biopsy_gone\.tif: file \S*biopsy_gone\.tif not found on this machine", err), err
    assert re.search(r"error: \S*never_stored\.tif: no slide 'never_stored' in the store", err), err
    assert "2 of 3 slides failed" in err
    assert f"biopsy_ok: {len(boxes)} cropped" in out
    assert _count(Session, Prediction) == len(boxes)


def test_a_classifier_whose_classes_are_not_the_datasets_is_refused(setup, store_url: str, tmp_path: Path, capsys):
    from annotation_db import store

    Session, ckpt, slide, _ = setup
    path = slide("biopsy_2")
    with Session() as s, s.begin():
        store.create_dataset(s, "two", ["globally_sclerotic", "non_globally_sclerotic"], root=tmp_path / "two")
    rc = glom(["classify-slides", str(path), "--dataset", "two", "--checkpoint", str(ckpt), "--db", store_url,
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "are none of dataset 'two'" in err and str(ckpt) in err, err
    rc = glom(["classify-slides", str(path), "--dataset", "nope", "--checkpoint", str(ckpt), "--db", store_url,
               "--no-progress"])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_the_device_is_the_one_asked_for_and_a_missing_gpu_is_refused_before_any_work(setup, store_url: str,
                                                                                     capsys, monkeypatch):
    import torch

    from annotation_db.models import Image, Prediction
    from core import diagnosis

    Session, ckpt, slide, boxes = setup
    path = slide("biopsy_dev")
    common = [str(path), "--dataset", "glom", "--checkpoint", str(ckpt), "--db", store_url, "--no-progress"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine as one without a GPU
    assert glom(["classify-slides", *common, "--device", "cuda"]) == 2
    assert "device 'cuda' was asked for but this machine has no CUDA GPU" in capsys.readouterr().err
    assert _count(Session, Image) == 0 and _count(Session, Prediction) == 0  # refused before cropping
    assert glom(["classify-slides", *common, "--device", "bogus"]) == 2
    assert "unknown device 'bogus'" in capsys.readouterr().err

    loaded = []
    real = diagnosis.Predictor.from_checkpoint
    monkeypatch.setattr(diagnosis.Predictor, "from_checkpoint",
                        lambda p, device="cpu": loaded.append(str(device)) or real(p, device))
    diagnosis._load_cached.cache_clear()
    assert glom(["classify-slides", *common, "--device", "auto"]) == 0  # auto: the CPU on a machine without CUDA
    assert loaded == ["cpu"] and _count(Session, Prediction) == len(boxes)
    capsys.readouterr()


def test_on_ray_one_task_per_slide_gives_the_local_results(ray_address: str, setup, store_url: str, capsys):
    Session, ckpt, slide, boxes = setup
    local, on_ray = [slide("local_a"), slide("local_b")], [slide("ray_a"), slide("ray_b")]
    common = ["--dataset", "glom", "--checkpoint", str(ckpt), "--db", store_url, "--threads", "1", "--no-progress"]
    assert glom(["classify-slides", *map(str, local), *common]) == 0
    capsys.readouterr()
    assert glom(["classify-slides", *map(str, on_ray), *common, "--ray", ray_address]) == 0
    out = capsys.readouterr().out
    nodes = set()
    for p in on_ray:
        line = next(ln for ln in out.splitlines() if ln.startswith(p.stem + ":"))
        assert f"{len(boxes)} cropped" in line and f"{len(boxes)} predicted" in line, line
        nodes.add(re.search(r"\[(\S+ [0-9a-f]{8})\]$", line).group(1))
    assert len(nodes) == 2, f"the tasks ran on one node only: {nodes}"
    want = _predictions(Session, "local_a")
    assert _predictions(Session, "local_b").keys() == want.keys()
    for name in ("ray_a", "ray_b"):  # the same crops, the same classes and probabilities as in this process
        got = _predictions(Session, name)
        assert got.keys() == want.keys()
        for box, (cls, probs) in got.items():
            assert cls == want[box][0]
            assert probs == pytest.approx(want[box][1], abs=1e-5)
    # resumed: a second Ray run crops and predicts nothing
    assert glom(["classify-slides", *map(str, on_ray), *common, "--ray", ray_address]) == 0
    assert capsys.readouterr().out.count("0 cropped into 'glom', 0 predicted") == 2
    # the loopback cluster has no GPU: asking for CUDA is refused before a task is submitted
    assert glom(["classify-slides", *map(str, on_ray), *common, "--ray", ray_address, "--device", "cuda"]) == 2
    assert f"--device cuda: the Ray cluster at {ray_address} has no GPU" in capsys.readouterr().err
