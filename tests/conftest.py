"""Shared fixtures: real SQLite and PostgreSQL databases, settings, and a CLI runner.

PostgreSQL: each test run makes its own database (dropped afterwards) on DRIP_TEST_POSTGRES_URL,
default postgresql://postgres@127.0.0.1:5432/postgres. Without a server the PostgreSQL tests skip,
except under CI (the CI variable set), where they fail.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from drip import db
from drip.cli import App, cli
from drip.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET = "test-secret-0123456789abcdefghijklmnop"  # DRIP_SECRET_KEY: 32 bytes or more
POSTGRES_ADMIN_URL = os.environ.get(
    "DRIP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TABLES = ("events", "deliveries", "enrolments", "patients", "suppressions")


# The files that take longest (real workers, servers, wheels), started first so that the test
# processes (scripts/test runs several, a file each at a time) finish together.
LONGEST_FIRST = (
    "test_web.py",
    "test_unsubscribe_e2e.py",
    "test_packaging.py",
    "test_pipeline.py",
    "test_promises.py",
    "test_metrics.py",
    "test_doctor.py",
    "test_supervisor.py",
    "test_status.py",
    "test_logs.py",
    "test_flower.py",
    "test_ratelimit.py",
    "test_operations.py",
    "test_demo.py",
    "test_compose.py",
)


def _started_at(item: pytest.Item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_started_at)  # stable: the order within each file stays
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("db_kind") == "postgresql":
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test run."""
    admin = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg")
    try:
        admin_engine = create_engine(admin, isolation_level="AUTOCOMMIT")
        with admin_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 - any failure to connect means "no server"
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required under CI and is not reachable: {e}")
        pytest.skip(f"PostgreSQL not reachable at {admin.render_as_string()}: {e}")
    name = f"drip_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin_engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.set(database=name).render_as_string(hide_password=False)
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    yield url
    with admin_engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin_engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (migrating once is faster)."""
    path = tmp_path_factory.mktemp("template") / "drip.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(request: pytest.FixtureRequest, db_kind: str, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database of each kind."""
    if db_kind == "sqlite":
        path = tmp_path / "drip.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = db.make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a drip command in a test: its own database and var/."""
    return {
        "DRIP_DATABASE_URL": db_url,
        "DRIP_SECRET_KEY": TEST_SECRET,
        "DRIP_MAIL_URL": f"file://{tmp_path / 'outbox'}",
        "DRIP_NOW": "2026-10-30T14:00:00Z",
        "DRIP_CLINIC_TIMEZONE": "America/New_York",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def drip(env: dict[str, str]) -> Callable[..., Result]:
    """Run a drip command in-process: drip("enroll", "a@b.example", …, env={…})."""

    def run(*args: str, input: str | None = None, **overrides: Any) -> Result:
        environ = env | overrides.pop("env", {})
        runner = CliRunner()
        return runner.invoke(cli, list(args), obj=App(environ=environ), input=input, **overrides)

    return run


NOW = datetime(2026, 10, 30, 14, 0, tzinfo=UTC)
