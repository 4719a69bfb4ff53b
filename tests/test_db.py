"""Engines: what every connection they hand out is set up with."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.engine import make_url

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
