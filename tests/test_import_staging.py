"""A large import stages its rows in short transactions and publishes them in one (issue 11, part
3): a click commits while an import is half-way, and a failed or killed import leaves nothing
anyone sees. On SQLite and PostgreSQL, with the 789 real crops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from annotation_db import importer, staging, store
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.formats import read_csv
from annotation_db.label_resolution import labels_per_annotator
from annotation_db.models import (
    Base,
    Image,
    ImportBatch,
    ImportStagedImage,
    ImportStagedLabel,
    Label,
)
from core.cli import main as glom

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["globally_sclerotic", "non_globally_sclerotic"]


@pytest.fixture
def Session(store_url):
    engine = create_store_engine(store_url)
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def labels(bueno_dir: Path, tmp_path: Path) -> Path:
    """The real labels.csv, flipped: every label differs from the one the store already holds."""
    lines = (bueno_dir / "labels.csv").read_text().splitlines()
    flip = {"globally_sclerotic": "non_globally_sclerotic", "non_globally_sclerotic": "globally_sclerotic"}
    out = [lines[0]]
    for line in lines[1:]:
        path, label, *rest = line.split(",")
        out.append(",".join([path, flip[label], *rest]))
    f = tmp_path / "flipped.csv"
    f.write_text("\n".join(out) + "\n")
    return f


def _seed(Session, bueno_dir: Path, n: int = 300) -> None:
    """A store that is not empty: the first ``n`` crops labeled, plus one click's label."""
    records = read_csv(bueno_dir / "labels.csv")[:n]
    with Session() as s, s.begin():
        ds = importer.ensure_dataset(s, "bueno", class_names=CLASSES, root=bueno_dir)
        importer.import_records(s, ds, records, annotator="imported", source="import:csv")
    _click(Session, "dr_li", 0)


def _click(Session, who: str, i: int) -> None:
    """What the labeling app does on a key press: one short transaction."""
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "bueno")
        img = s.scalars(select(Image).where(Image.dataset_id == ds.id).order_by(Image.id).offset(i).limit(1)).one()
        store.set_label(s, img, who, ["globally_sclerotic"])


def _snapshot(Session) -> dict[str, list[tuple]]:
    """Every row of every table, in a stable order."""
    with Session() as s:
        return {t.name: sorted(map(tuple, s.execute(select(t)).all()), key=repr) for t in Base.metadata.sorted_tables}


def _staged(Session) -> tuple[int, int, int]:
    with Session() as s:
        return tuple(s.scalar(select(func.count()).select_from(m)) for m in (ImportBatch, ImportStagedImage,
                                                                               ImportStagedLabel))


def _import(Session, labels: Path, bueno_dir: Path, **kw) -> importer.ImportReport:
    return importer.import_staged(Session, "bueno", read_csv(labels), class_names=CLASSES, root=bueno_dir,
                                  annotator="imported", source="import:csv", **kw)


def test_a_bad_line_near_the_end_of_a_big_file_changes_nothing(store_url, Session, bueno_dir, labels, capsys):
    _seed(Session, bueno_dir)
    lines = labels.read_text().splitlines()
    path, _, *rest = lines[-3].split(",")
    lines[-3] = ",".join([path, "crescentic", *rest])  # line 788 of 790
    labels.write_text("\n".join(lines) + "\n")
    before = _snapshot(Session)
    rc = glom(["--db", store_url, "import", "csv", str(labels), "--dataset", "bueno"])
    assert rc == 2
    assert f"{labels.name}:788: field 'label': unknown class 'crescentic'" in capsys.readouterr().err
    assert _snapshot(Session) == before


@pytest.mark.parametrize("where", ["staging", "publish"])
def test_an_error_while_writing_changes_nothing(Session, bueno_dir, labels, monkeypatch, where):
    """Past every check, an error while staging (after some chunks committed) or inside the
    publish (after its first statements ran) leaves the store exactly as it was."""
    _seed(Session, bueno_dir)
    before = _snapshot(Session)
    seen = []

    def after_chunk(done: int, total: int) -> None:
        seen.append(done)
        if where == "staging" and done == 5:
            assert _staged(Session)[1] > 0  # the failure comes after rows were staged and committed
            raise RuntimeError("disk full")

    real = staging.publish_rows

    def failing_publish(session, batch_id, dataset_id, **kw):
        counts = real(session, batch_id, dataset_id, **kw)
        assert counts.labels_written == 789
        raise RuntimeError("connection lost")

    if where == "publish":
        monkeypatch.setattr(staging, "publish_rows", failing_publish)
    with pytest.raises(RuntimeError):
        _import(Session, labels, bueno_dir, chunk=50, after_chunk=after_chunk)
    assert seen and (where == "publish") == (len(seen) == 16)
    assert _snapshot(Session) == before
    assert _staged(Session) == (0, 0, 0)


def test_a_click_commits_while_an_import_is_half_way(store_url, Session, bueno_dir, labels):
    """The import pauses after its 4th of 16 staged chunks; a click made then (with a 1 s busy
    timeout on SQLite) commits at once, and does not see the import's rows."""
    _seed(Session, bueno_dir)
    midway, release = threading.Event(), threading.Event()

    def after_chunk(done: int, total: int) -> None:
        if done == 4:
            midway.set()
            assert release.wait(60), "the test never released the import"

    result: dict = {}

    def run() -> None:
        try:
            result["report"] = _import(Session, labels, bueno_dir, chunk=50, after_chunk=after_chunk)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert midway.wait(120), f"the import never got half-way: {result}"
        impatient = create_store_engine(store_url, connect_args={"timeout": 1.0} if "sqlite" in store_url else {})
        if "sqlite" in store_url:
            with impatient.connect() as conn:
                conn.exec_driver_sql("PRAGMA busy_timeout = 1000")
        click = make_sessionmaker(impatient)
        _click(click, "dr_wang", 5)  # raises "database is locked" if the import held the lock
        with click() as s:
            assert s.scalar(select(func.count()).select_from(Image)) == 300  # nothing of the import yet
            assert s.scalar(select(func.count()).select_from(Label).where(Label.classes.is_not(None))) == 302
        impatient.dispose()
    finally:
        release.set()
        worker.join(300)
    assert "error" not in result, result
    report = result["report"]
    assert (report.images_added, report.images_existing, report.labels_written) == (489, 300, 789)
    with Session() as s:
        ds = store.get_dataset(s, "bueno")
        assert s.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == ds.id)) == 789
        votes = labels_per_annotator(s, ds)
        assert sum("dr_wang" in v for v in votes.values()) == 1  # the click survived the publish
    assert _staged(Session) == (0, 0, 0)


KILLED = textwrap.dedent(
    """
    import sys, time
    from annotation_db import importer
    from annotation_db.db import open_store
    from annotation_db.formats import read_csv
    url, labels, root = sys.argv[1:4]

    def after_chunk(done, total):
        print(f"staged {done}/{total}", flush=True)
        if done == 6:
            time.sleep(600)  # killed here

    importer.import_staged(open_store(url, create=False), "fresh", read_csv(labels), class_names=%r, root=root,
                           annotator="imported", source="import:csv", chunk=50, after_chunk=after_chunk)
    """
    % CLASSES
)


def test_a_killed_import_leaves_nothing_visible_and_the_next_import_cleans_up(store_url, Session, bueno_dir,
                                                                              labels):
    _seed(Session, bueno_dir)
    before = _snapshot(Session)
    proc = subprocess.Popen([sys.executable, "-c", KILLED, store_url, str(labels), str(bueno_dir)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("staged 6/"):
                break
        else:
            pytest.fail(f"the import never staged 6 chunks: {proc.stderr.read()}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert _staged(Session)[:2] == (1, 300)  # half an import sits in the staging tables ...
    after_kill = _snapshot(Session)
    for table in ("dataset", "image", "label", "label_event", "slide", "annotator", "class_def"):
        assert after_kill[table] == before[table], table  # ... and nobody sees any of it
    with Session() as s:
        assert [d.name for d in store.list_datasets(s)] == ["bueno"]

    assert glom(["--db", store_url, "import", "csv", str(labels), "--dataset", "fresh", "--root", str(bueno_dir)]) == 0
    assert _staged(Session) == (0, 0, 0)
    with Session() as s:
        ds = store.get_dataset(s, "fresh")
        assert s.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == ds.id)) == 789


def test_a_running_import_is_not_taken_for_abandoned(monkeypatch):
    host, pid = staging._owner()
    now = staging.utcnow()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not staging.is_abandoned(ImportBatch(owner_host=host, owner_pid=pid, heartbeat_at=now))
    assert not staging.is_abandoned(ImportBatch(owner_host=host, owner_pid=os.getppid(), heartbeat_at=now))
    assert staging.is_abandoned(ImportBatch(owner_host=host, owner_pid=dead.pid, heartbeat_at=now))
    # another machine's import: only its heartbeat tells
    assert not staging.is_abandoned(ImportBatch(owner_host="elsewhere", owner_pid=dead.pid, heartbeat_at=now))
    monkeypatch.setenv("GLOM_IMPORT_STALE_S", "0")
    assert staging.is_abandoned(ImportBatch(owner_host="elsewhere", owner_pid=1, heartbeat_at=now))


def test_two_imports_into_one_new_dataset_at_once(Session, bueno_dir, tmp_path):
    """Both stage before either publishes; the second publish finds the dataset and half of its
    images registered by the first, and adds the rest."""
    rows = (bueno_dir / "labels.csv").read_text().splitlines()
    halves = []
    for name, part in (("a", rows[1:500]), ("b", rows[300:])):
        f = tmp_path / f"{name}.csv"
        f.write_text("\n".join([rows[0], *part]) + "\n")
        halves.append(f)
    staged = threading.Barrier(2, timeout=120)

    def after_chunk(done: int, total: int) -> None:
        if done == total:
            staged.wait()

    reports, errors = [], []

    def run(f: Path) -> None:
        try:
            reports.append(importer.import_staged(Session, "both", read_csv(f), class_names=CLASSES, root=bueno_dir,
                                                  annotator="imported", source="import:csv", after_chunk=after_chunk))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f,)) for f in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert sum(r.images_added for r in reports) == 789 and min(r.images_added for r in reports) in (290, 299)
    with Session() as s:
        ds = store.get_dataset(s, "both")
        assert s.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == ds.id)) == 789
        assert len(labels_per_annotator(s, ds)) == 789
        assert s.execute(text("SELECT count(*) FROM label_event")).scalar() == 789  # the overlap's labels once
