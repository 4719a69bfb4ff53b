"""Engines: what every connection they hand out is set up with."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from drip import db
from drip.cli import App, cli

SYNCHRONOUS_FULL = 2  # what `PRAGMA synchronous` reads for FULL


def test_every_sqlite_connection_syncs_each_commit_to_disk(tmp_path: Path) -> None:
    """In WAL mode, synchronous=NORMAL lets a committed `sending` roll back at a power loss, and
    the email would then be sent again; FULL syncs the WAL at every commit. The per-email commit
    (sending._EmailCommit) runs on the driver connection under a pooled one: the same setting."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'drip.db'}")
    try:
        with engine.connect() as first, engine.connect() as second:  # two pooled connections
            for connection in (first, second):
                assert connection.scalar(text("PRAGMA journal_mode")) == "wal"
                assert connection.scalar(text("PRAGMA synchronous")) == SYNCHRONOUS_FULL
                raw: Any = connection.connection.driver_connection
                assert raw.execute("PRAGMA synchronous").fetchone()[0] == SYNCHRONOUS_FULL
                connection.rollback()  # BEGIN IMMEDIATE took the write lock: let the next go
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_a_database_locked_past_the_busy_timeout_is_busy_not_a_traceback(
    env: dict[str, str], db_url: str
) -> None:
    """Another process holds SQLite's write lock for longer than drip waits for it."""
    app = App(environ=env)
    app.engine = db.make_engine(db_url, busy_ms=100)  # instead of 30 s
    holder = sqlite3.connect(make_url(db_url).database or "", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        result = CliRunner().invoke(
            cli, ["enroll", "ann@example.com", "--campaign", "ketamine-onboarding",
                  "--first-name", "Ann"], obj=app,
        )  # fmt: skip
    finally:
        holder.close()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "the database is busy" in result.stderr and "drip enroll --csv" in result.stderr
    assert "try again" in result.stderr and "Traceback" not in result.output


def test_a_failed_statement_s_error_names_none_of_its_parameters(engine: Engine) -> None:
    """Workers and commands look patients up by address; Celery logs the exception of a task
    that fails (a connection dropped by a failover, say), and SQLAlchemy's message lists the
    statement's parameters unless told not to (tests/test_unsubscribe_e2e.py stages it)."""
    address = "zz.canary.4417@example.org"
    with pytest.raises(DBAPIError) as raised, engine.connect() as connection:
        connection.execute(text("SELECT id FROM no_such_table WHERE email = :a"), {"a": address})
    assert "no_such_table" in str(raised.value)  # the statement still shows, for operators
    assert address not in str(raised.value) and address not in repr(raised.value)
