"""Schema: migrations create exactly what the models declare, on SQLite and PostgreSQL."""

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from annotation_db import db
from annotation_db.models import Base


def test_migrations_match_models(store_url):
    engine = db.create_store_engine(store_url)
    db.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"


def test_upgrade_is_idempotent_and_downgrade_round_trips(store_url):
    engine = db.create_store_engine(store_url)
    db.upgrade(engine)
    head = db.current_revision(engine)
    assert head == db.head_revision()
    db.upgrade(engine)  # no-op
    db.downgrade(engine, "base")
    assert not db.has_tables(engine)
    db.upgrade(engine)
    assert db.current_revision(engine) == head
    engine.dispose()


def test_check_schema_names_the_fix(sqlite_url):
    engine = db.create_store_engine(sqlite_url)
    try:
        db.check_schema(engine)
    except db.SchemaOutOfDateError as e:
        assert "glom db init" in str(e)
    else:
        raise AssertionError("an empty store passed the schema check")


def test_sqlite_runs_wal_with_foreign_keys(sqlite_url):
    engine = db.create_store_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    engine.dispose()


def test_default_url_is_sqlite_under_data(monkeypatch):
    monkeypatch.delenv("GLOM_DB", raising=False)
    assert db.resolve_url() == "sqlite:///data/glomlab.db"
    monkeypatch.setenv("GLOM_DB", "postgresql+psycopg://u@127.0.0.1/x")
    assert db.resolve_url() == "postgresql+psycopg://u@127.0.0.1/x"
    assert db.resolve_url("my.db") == "sqlite:///my.db"


def test_foreign_keys_are_enforced(Session):
    from annotation_db.models import Label

    with Session() as s:
        s.begin()
        s.add(Label(image_id=12345, annotator_id=1, classes=["x"]))
        try:
            s.flush()
        except sa.exc.IntegrityError:
            s.rollback()
        else:
            raise AssertionError("a label for a missing image was accepted")


def test_migration_0004_computes_the_margin_of_stored_predictions(store_url):
    """Predictions stored before 0004 get their margin, so the uncertain queue sees them."""
    engine = db.create_store_engine(store_url)
    db.upgrade(engine, "0003")
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO dataset (name, root, multi_label, description, created_at) "
                             "VALUES ('d', '/tmp', false, '', CURRENT_TIMESTAMP)"))
        ds = conn.scalar(sa.text("SELECT id FROM dataset"))
        for i in range(3):
            conn.execute(sa.text("INSERT INTO image (dataset_id, path, sha256, width, height, created_at) "
                                 "VALUES (:d, :p, :h, 8, 8, CURRENT_TIMESTAMP)"), {"d": ds, "p": f"{i}.png", "h": f"{i:064d}"})
        ids = conn.scalars(sa.text("SELECT id FROM image ORDER BY id")).all()
        for image_id, probs in zip(ids, ['{"a": 0.7, "b": 0.2, "c": 0.1}', '{"a": 0.5, "b": 0.5}', '{}']):
            conn.execute(sa.text("INSERT INTO prediction (image_id, checkpoint_id, probs, predicted, created_at) "
                                 "VALUES (:i, 'm', :p, 'a', CURRENT_TIMESTAMP)"), {"i": image_id, "p": probs})
    db.upgrade(engine)
    with engine.connect() as conn:
        margins = conn.execute(sa.text("SELECT margin FROM prediction ORDER BY image_id")).scalars().all()
    engine.dispose()
    assert margins == [pytest.approx(0.5), 0.0, 0.0]


def test_open_store_from_many_threads_at_once_migrates_once(tmp_path):
    """A page's first requests open the store from several threads at once (the viewer's checkpoint
    and dataset lists): Alembic's module-level context must not be entered twice."""
    import threading

    from annotation_db.db import open_store

    errors: list[BaseException] = []
    makers = []
    for k in range(3):
        url = f"sqlite:///{tmp_path / f'store{k}.db'}"
        barrier = threading.Barrier(6)

        def go(url=url, barrier=barrier):
            barrier.wait()
            try:
                makers.append(open_store(url))
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(e)

        threads = [threading.Thread(target=go) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len({id(m) for m in makers}) == 3  # one engine per store
