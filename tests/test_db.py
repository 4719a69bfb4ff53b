"""Engines: what every connection they hand out is set up with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import text

from drip import db

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
