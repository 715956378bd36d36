"""core.diagnosis: batches (inference, store writes, the CSV) and checkpoint loading errors, and the
viewer's batch handler over them, in this process with a temporary SQLite store."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.models import Image, Prediction
from core import diagnosis
from core.checkpoint import CheckpointError
from core.diagnosis import BatchCrop, UploadsPolicy, diagnose_batch, load_viewer_checkpoint
from core.uploads import check_upload
from tests.demo_checkpoint import demo_checkpoint, demo_set

pytestmark = pytest.mark.slow  # trains the shared tiny model once per session (a few seconds)


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def same_named(tmp_path: Path) -> list[Path]:
    """Two different crops, both uploaded as ``001.png`` (from two folders)."""
    crops = demo_set(tmp_path / "demo", 1, seed=5)
    out = []
    for folder, src in (("a", crops.paths[0]), ("b", crops.paths[3])):
        (tmp_path / folder).mkdir()
        out.append(shutil.copy(src, tmp_path / folder / "001.png"))
    assert _sha(out[0]) != _sha(out[1])
    return [Path(p) for p in out]


@pytest.fixture
def Session(tmp_path: Path):  # noqa: N802 - a session factory, named like one
    engine = create_store_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_same_named_uploads_keep_their_own_file_row_and_prediction(tmp_path, same_named, Session) -> None:  # noqa: N803
    _, weights = demo_checkpoint(tmp_path / "runs" / "demo" / "best")
    ckpt = load_viewer_checkpoint(weights, tmp_path / "runs")
    crops = [BatchCrop(check_upload(p), p) for p in same_named]
    out = diagnose_batch(ckpt, crops, Session, uploads=UploadsPolicy(tmp_path / "data"), method="gradcam")
    assert [d.rank for d in out.crops] == [1, 2] and out.n_shown == 2
    assert all(d.result.heat is not None for d in out.crops)
    with Session() as s:
        for d in out.crops:
            image = s.get(Image, d.image_id)
            assert image.sha256 == d.crop.image.sha256 == _sha(d.crop.file)  # its own bytes, not the other's
            [pred] = s.scalars(select(Prediction).where(Prediction.image_id == image.id)).all()
            assert pred.probs == pytest.approx(d.result.probs)
            assert pred.margin == pytest.approx(d.result.margin)  # one margin: the queue's and the CSV's rank
    rows = list(csv.DictReader(out.csv_path.open()))
    assert [r["name"] for r in rows] == ["001.png", "001.png"]
    assert [(r["sha256"], int(r["store_image_id"])) for r in rows] == [
        (d.crop.image.sha256, d.image_id) for d in out.crops]
    assert rows[0]["sha256"] != rows[1]["sha256"]


def test_the_viewer_gallery_opens_the_upload_that_was_clicked(tmp_path, same_named, monkeypatch) -> None:
    """Two uploads named 001.png: each gallery entry opens its own file (they were matched by name)."""
    from app import viewer

    _, weights = demo_checkpoint(tmp_path / "runs" / "demo" / "best")
    monkeypatch.setenv("GLOM_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("GLOM_DB", f"sqlite:///{tmp_path / 'viewer.db'}")
    monkeypatch.setenv("GLOM_DATA_ROOT", str(tmp_path / "data"))
    for name in ("GLOM_VIEWER_CHECKPOINT", "GLOM_SINGLE_USER", "GLOM_VIEWER_MAX_UPLOADS"):
        monkeypatch.delenv(name, raising=False)
    gallery, csv_path, _, _, state = viewer.batch(str(weights), [str(p) for p in same_named], "", 0.45)
    assert len(gallery) == 2 and state["names"] == ["001.png", "001.png"]
    assert sorted(state["files"]) == sorted(str(p) for p in same_named)
    engine = create_store_engine(f"sqlite:///{tmp_path / 'viewer.db'}")
    try:
        with make_sessionmaker(engine)() as s:
            for file, ref in zip(state["files"], state["refs"], strict=True):
                assert s.get(Image, int(ref.removeprefix("store:"))).sha256 == _sha(file)
    finally:
        engine.dispose()
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["sha256"] for r in rows] == [_sha(f) for f in state["files"]]


def test_a_damaged_checkpoint_is_a_checkpoint_error_but_a_bug_is_not(tmp_path, monkeypatch) -> None:
    _, weights = demo_checkpoint(tmp_path / "runs" / "good" / "best")
    broken = tmp_path / "runs" / "broken" / "best.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(b"\x00" * 64)
    shutil.copy(weights.with_suffix(".json"), broken.with_suffix(".json"))
    with pytest.raises(CheckpointError, match=r"best\.safetensors could not be loaded: SafetensorError"):
        load_viewer_checkpoint(broken)

    def bug(*args, **kwargs):
        raise KeyError("a typo in the loader")

    monkeypatch.setattr(diagnosis.Predictor, "from_checkpoint", bug)
    diagnosis._load_cached.cache_clear()
    with pytest.raises(KeyError, match="a typo in the loader"):  # not dressed up as a bad checkpoint
        load_viewer_checkpoint(weights)
    diagnosis._load_cached.cache_clear()
