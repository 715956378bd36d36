"""Schema: migrations create exactly what the models declare, on SQLite and PostgreSQL."""

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
