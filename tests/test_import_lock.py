"""An import reads, hashes and checks its images before it opens the write transaction: on SQLite
(one writer at a time) a clinician's click is not kept waiting while a large import hashes
(issue 11, part 3). Still all or nothing: a bad image found while hashing stores nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from annotation_db import store
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.images import read_image_meta
from annotation_db.models import Image
from core.cli import main as glom


@pytest.fixture
def crops(tmp_path: Path, bueno_dir: Path) -> Path:
    root = tmp_path / "crops"
    root.mkdir()
    for i, p in enumerate(sorted(bueno_dir.glob("globally_sclerotic/*.png"))[:4]):
        (root / f"c{i}.png").write_bytes(p.read_bytes())
    (root / "labels.csv").write_text("image,label\n" + "".join(f"c{i}.png,normal\n" for i in range(4)))
    return root


def test_hashing_happens_before_the_write_lock_is_taken(tmp_path, crops, monkeypatch):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    with make_sessionmaker(engine)() as s, s.begin():
        store.create_dataset(s, "other", ["a"], root=crops)
    hashing, release = threading.Event(), threading.Event()
    real = read_image_meta

    def slow_meta(path, limits=None):  # noqa: ANN001, ANN202
        hashing.set()
        assert release.wait(30), "the test never released the import"
        return real(path, limits)

    monkeypatch.setattr("annotation_db.store.read_image_meta", slow_meta)
    monkeypatch.setattr("annotation_db.importer.read_image_meta", slow_meta)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("rc", glom(
        ["--db", url, "import", "csv", str(crops / "labels.csv"), "--dataset", "d", "--classes", "normal,crescent"])))
    worker.start()
    try:
        assert hashing.wait(60), "the import never started hashing"
        # A click elsewhere writes while the import hashes: with a 1 s busy timeout it must not wait.
        click = create_store_engine(url, connect_args={"timeout": 1.0})
        with click.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout = 1000")
            conn.execute(text("UPDATE dataset SET description = 'clicked' WHERE name = 'other'"))
            conn.commit()
        click.dispose()
    finally:
        release.set()
        worker.join(60)
    assert result.get("rc") == 0
    with make_sessionmaker(engine)() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 4
    engine.dispose()


def test_a_bad_image_found_while_hashing_stores_nothing(tmp_path, crops, capsys):
    (crops / "c3.png").write_text("not an image")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    rc = glom(["--db", url, "import", "csv", str(crops / "labels.csv"), "--dataset", "d", "--classes", "normal"])
    assert rc == 2 and "labels.csv:5: field 'image'" in capsys.readouterr().err
    engine = create_store_engine(url)
    with make_sessionmaker(engine)() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 0
        assert store.list_datasets(s) == []
    engine.dispose()
