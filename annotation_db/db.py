"""Engines, sessions and schema migrations for the annotation store.

The store lives at any SQLAlchemy URL. Without one, it is an SQLite file under ``./data/``;
``GLOM_DB`` (or ``--db`` on the command line) points elsewhere, e.g.
``postgresql+psycopg://user@127.0.0.1:5432/glomlab``.

SQLite is opened in WAL mode with foreign keys on, and every transaction starts with
``BEGIN IMMEDIATE``: two labeling processes then queue for the write lock (up to the busy
timeout) instead of failing with "database is locked" when a read turns into a write.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from annotation_db.errors import GlomError

log = logging.getLogger(__name__)

DEFAULT_DB_PATH = Path("data") / "glomlab.db"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


class StoreError(GlomError):
    """Base class of the store's errors: the message says what to do."""


class SchemaOutOfDateError(StoreError):
    pass


def resolve_url(url: str | None = None) -> str:
    """The store URL: the argument, else ``$GLOM_DB``, else ``sqlite:///data/glomlab.db``.

    A bare file path (``my.db``) is taken as an SQLite file.
    """
    url = url or os.environ.get("GLOM_DB") or f"sqlite:///{DEFAULT_DB_PATH}"
    if "://" not in url:
        url = f"sqlite:///{url}"
    return url


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001 - DB-API objects
        # Let SQLAlchemy's "begin" event own transaction start (pysqlite would defer it).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_store_engine(url: str | None = None, **kwargs) -> Engine:
    """Create an engine for the store at ``url`` (see :func:`resolve_url`)."""
    url = resolve_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
    else:
        kwargs.setdefault("pool_pre_ping", True)
        engine = create_engine(url, **kwargs)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


# Alembic's command API works through module-level proxies (``alembic.context``), so two threads
# migrating at once in one process break each other (KeyError: 'config'). One at a time.
_MIGRATE_LOCK = threading.RLock()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Create or migrate the schema to ``revision`` (Alembic); safe to run repeatedly, from any thread."""
    from alembic import command

    with _MIGRATE_LOCK:
        command.upgrade(_alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    with _MIGRATE_LOCK:
        command.downgrade(_alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()  # type: ignore[arg-type]


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaOutOfDateError` unless the store is at the newest migration."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        hint = "glom db init" if current is None else "glom db upgrade"
        raise SchemaOutOfDateError(
            f"The store at {engine.url.render_as_string(hide_password=True)} is at schema "
            f"revision {current or '(empty)'}, the code expects {head}: run `{hint}`."
        )


def has_tables(engine: Engine) -> bool:
    return inspect(engine).has_table("dataset")


def open_store(url: str | None = None, create: bool = True) -> sessionmaker[Session]:
    """A sessionmaker for the store at ``url``, migrating it first when ``create``.

    Cached per URL, so apps and the command line share one engine (and its pool). Threads that
    ask at once (a page's first requests) wait for the first one: one engine, one migration.
    """
    with _OPEN_LOCK:
        return _open_store(url, create)


_OPEN_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def _open_store(url: str | None, create: bool) -> sessionmaker[Session]:
    engine = create_store_engine(url)
    if create:
        upgrade(engine)
    else:
        check_schema(engine)
    return make_sessionmaker(engine)


open_store.cache_clear = _open_store.cache_clear  # type: ignore[attr-defined]  # tests and benches start afresh
