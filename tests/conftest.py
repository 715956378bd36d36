"""Shared fixtures: the real data beside the checkout, and stores on SQLite and PostgreSQL.

PostgreSQL tests run against the server named by ``GLOM_TEST_PG`` (``.ci/test.sh`` starts one on
loopback). Without it they are skipped, unless ``GLOM_REQUIRE_PG=1`` (as in CI), where a missing
server fails the run instead of silently testing less.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from annotation_db.db import create_store_engine, make_sessionmaker, upgrade

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GLOM_SHARED_DATA", REPO.parent / "shared" / "data"))
BUENO = SHARED_DATA / "glomeruli-bueno"
WSI_DIR = SHARED_DATA / "wsi"


def _require(flag: str) -> bool:
    return os.environ.get(flag, "") not in ("", "0")


@pytest.fixture(scope="session")
def bueno_dir() -> Path:
    if not (BUENO / "labels.csv").is_file():
        pytest.fail(f"real crops not found at {BUENO}: ../shared/data must sit beside the checkout")
    return BUENO


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    if not WSI_DIR.is_dir():
        pytest.fail(f"real slides not found at {WSI_DIR}: ../shared/data must sit beside the checkout")
    return WSI_DIR


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    url = os.environ.get("GLOM_TEST_PG")
    if not url:
        if _require("GLOM_REQUIRE_PG"):
            pytest.fail("GLOM_REQUIRE_PG is set but GLOM_TEST_PG names no PostgreSQL server")
        pytest.skip("no PostgreSQL server (set GLOM_TEST_PG, or run the suite through `make test`)")
    return url


@pytest.fixture
def pg_url(pg_server_url: str):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"glomtest_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request) -> str:
    """The store URL, once per backend."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def Session(store_url: str):
    """A sessionmaker over a freshly migrated store (each backend)."""
    engine = create_store_engine(store_url)
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def SqliteSession(sqlite_url: str):
    engine = create_store_engine(sqlite_url)
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def tiny_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A detector trained once per run on three real tiles (``tests/detector_fixtures.py``)."""
    from tests.detector_fixtures import train_tiny_detector

    return train_tiny_detector(tmp_path_factory.mktemp("detector"))


@pytest.fixture(scope="session")
def test_slide(tmp_path_factory: pytest.TempPathFactory):
    """A pyramidal TIFF of three real kidney tiles over glass, and its glomerulus mask (level 0)."""
    from tests.detector_fixtures import three_tile_slide

    return three_tile_slide(tmp_path_factory.mktemp("slide") / "three_tiles.tif")


@pytest.fixture(scope="session")
def ray_address():
    """A real two-node Ray cluster on loopback (one CPU each, ``tests/ray_local.py``), started once per session
    and shared by the Ray tests (tests/test_detect_ray.py, tests/test_classify_slides.py); skipped without ray."""
    pytest.importorskip("ray")
    from tests.ray_local import local_ray_cluster

    with local_ray_cluster(nodes=2, cpus_per_node=1) as address:
        yield address
