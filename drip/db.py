"""Engines, sessions and migrations, for SQLite and PostgreSQL alike.

SQLite runs in WAL mode with synchronous=FULL (the WAL is synced at every commit: with NORMAL a
committed `sending` can roll back at a power loss and the email go out again; the cost is in
docs/performance.md), a busy timeout, and every transaction starts with BEGIN IMMEDIATE:
a writer takes the lock up front and waits for it (in short steps, see begin_immediate), instead
of failing half-way through when another process wrote first.

Readers that only look (`make_reader`: the metrics of `drip serve`) take no write lock: on
SQLite a plain BEGIN, which in WAL mode neither waits for the writers nor holds them up.
"""

from __future__ import annotations

import random
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Column,
    Connection,
    CursorResult,
    Dialect,
    Engine,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from drip.clock import utcnow
from drip.errors import ConfigError, DripError
from drip.paths import MIGRATIONS
from drip.permissions import private_file, private_folder
from drip.urls import redact

SQLITE_BUSY_MS = 30_000
# Lease and due times written by one host are compared by another's clock. Two hosts within 2 s
# of the database are within 4 s of each other: well inside the shortest lease (10 s) and the
# ticker's resolution, and far beyond what NTP keeps (milliseconds): only a broken clock is off.
MAX_CLOCK_SKEW = timedelta(seconds=2)


def make_engine(url: str, *, busy_ms: int = SQLITE_BUSY_MS, **kwargs: Any) -> Engine:
    """An engine for a DRIP_DATABASE_URL; `postgresql://` uses psycopg 3. On SQLite, a writer
    waits up to `busy_ms` for another process's write lock. Its errors show a failed
    statement without its parameters: they hold patients' addresses (a worker looks a bouncing
    patient up by address), and Celery logs a failed task's exception, traceback and all."""
    kwargs.setdefault("hide_parameters", True)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"DRIP_DATABASE_URL is not a database URL: {redact(url)!r}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed.database, str(parsed), busy_ms, **kwargs)
    # No server-side prepared statements: psycopg prepares a query after 5 runs, and PostgreSQL
    # then keeps the plan made while a table was small (a lookup seq-scanning 100,000 patients
    # within one long CSV transaction, 35x slower). Planning each time costs well under 1 ms.
    connect_args = {"prepare_threshold": None} | kwargs.pop("connect_args", {})
    return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args, **kwargs)


def _sqlite_engine(database: str | None, url: str, busy_ms: int, **kwargs: Any) -> Engine:
    if database and database != ":memory:" and not database.startswith("file:"):
        private_folder(Path(database).parent)  # for the owner only: it holds patients' names
        private_file(Path(database))
    engine = create_engine(url, connect_args={"timeout": busy_ms / 1000}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy's "begin" below decide
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        begin_immediate(conn.connection.dbapi_connection, busy_ms)

    return engine


READ_TIMEOUT_SECONDS = 5


def make_reader(url: str, *, timeout: float = READ_TIMEOUT_SECONDS) -> Engine:
    """An engine that only reads, and answers or fails within about `timeout` seconds (to
    connect, and per statement), for a scrape that must answer before Prometheus gives up.

    SQLite: each transaction is a plain (deferred) BEGIN, so a reader never takes or waits for
    the write lock that workers commit under, and `query_only`; the file is opened, never
    created (a missing database is an error, not a new empty file). PostgreSQL: read-only
    transactions and a statement timeout, set by the server for the whole session."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"DRIP_DATABASE_URL is not a database URL: {redact(url)!r}") from None
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_reader(parsed.database or "", timeout)
    # jit: the planner prices drip's scalar subqueries pessimistically, and would spend more
    # compiling a count than running it (see drip.claims)
    options = (
        f"-c default_transaction_read_only=on -c statement_timeout={int(timeout * 1000)} "
        "-c jit=off"
    )
    connect_args = {"connect_timeout": max(int(timeout), 2), "options": options}
    return make_engine(url, connect_args=connect_args, pool_size=1, max_overflow=4)


def _sqlite_reader(database: str, timeout: float) -> Engine:
    if not database or database == ":memory:" or database.startswith("file:"):
        raise ConfigError("DRIP_DATABASE_URL: a reader needs a SQLite file, sqlite:///path")
    uri = f"file:{quote(str(Path(database).resolve()))}?mode=rw"  # rw: open, never create

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
        connection.isolation_level = None  # transactions are the "begin" event's below
        connection.execute("PRAGMA query_only=ON")
        return connection

    # A connection per use: opening a local file costs less than a scrape's queries, and no
    # idle connection keeps the file (or an old snapshot of its WAL) open between scrapes.
    engine = create_engine("sqlite+pysqlite://", creator=connect, poolclass=NullPool)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        raw: Any = conn.connection.dbapi_connection
        raw.execute("BEGIN")  # deferred: a read snapshot, no lock taken

    return engine


def begin_immediate(raw: Any, busy_ms: int = SQLITE_BUSY_MS) -> None:
    """BEGIN IMMEDIATE, waiting for the write lock in short, jittered steps.

    SQLite's own busy handler sleeps 1 ms, then 2, 5, 10… while another process holds the lock,
    which is longer than the whole transaction it is waiting for (a worker's per-email commit
    takes tens of microseconds): two workers then spend most of their time asleep. So the wait
    for the lock at BEGIN is done here; statements inside the transaction keep busy_timeout."""
    raw.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + busy_ms / 1000
        pause = 0.00002
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.0002)
    finally:
        raw.execute(f"PRAGMA busy_timeout={busy_ms}")


def explain(error: DBAPIError | sqlite3.DatabaseError) -> str | None:
    """What a database error that ended a command means for the person who ran it, or None for
    one that is a bug (it keeps its traceback). (SQLite's BEGIN IMMEDIATE, run from the
    engine's "begin" event, raises the driver's own error.)"""
    reason = error.orig if isinstance(error, DBAPIError) else error
    if "file is not a database" in str(reason):
        return (
            "DRIP_DATABASE_URL names a file that is not a SQLite database; check the path (drip "
            "creates the file itself when it does not exist)"
        )
    if "database is locked" in str(reason):
        return (
            "the database is busy: another process has held its write lock for longer than "
            "drip waits (usually a running `drip enroll --csv`, a worker sending a batch, or "
            "another tool with the file open); nothing was written; try again in a moment"
        )
    if isinstance(error, OperationalError | sqlite3.OperationalError):
        return f"database error, nothing was written: {reason}"
    return None


CONNECT_TIMEOUT = 5  # seconds, for the commands that must say soon that a server is not there


def probe_engine(url: str) -> Engine:
    """make_engine, giving up on a PostgreSQL server that does not answer within
    CONNECT_TIMEOUT (libpq would wait as long as TCP does); for `drip status` and `drip doctor`,
    whose job is to say so."""
    try:
        sqlite = make_url(url).get_backend_name() == "sqlite"
    except ArgumentError:
        sqlite = True  # make_engine says what is wrong with it
    if sqlite:
        return make_engine(url)
    return make_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT})


def shown_url(engine: Engine) -> str:
    """The engine's URL as messages may show it: without its password."""
    return redact(engine.url.render_as_string(hide_password=False))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """One session in one transaction: committed if the block ends normally, else rolled back."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


def insert_many(
    session: Session, table: Table, rows: list[dict[str, Any]], *returning: Column[Any]
) -> Sequence[tuple[Any, ...]]:
    """INSERT every row (all with the same keys, hashable values) in one go; with `returning`,
    those columns of each new row. The bulk path of enrolment.

    Without `returning`, each distinct value goes once through its column's bind processor (the
    same few instants recur in every row), then COPY on PostgreSQL, a driver executemany on
    SQLite; column defaults are not applied, so give every NOT NULL value. With `returning`,
    PostgreSQL gets one INSERT … SELECT FROM unnest(an array per column), as psycopg's
    executemany and multi-row VALUES both pay per row and parameter.
    """
    if not rows:
        return []
    connection = session.connection()
    dialect = connection.dialect
    names = list(rows[0])
    if not returning:
        values = _bind_values(dialect, table, names, rows)
        columns = ", ".join(dialect.identifier_preparer.quote(name) for name in names)
        target = f"{dialect.identifier_preparer.format_table(table)} ({columns})"
        if dialect.name == "postgresql":
            psycopg_connection: Any = connection.connection.driver_connection
            cursor = psycopg_connection.cursor()
            with cursor, cursor.copy(f"COPY {target} FROM STDIN") as copy:
                for row in values:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" for _ in names)  # SQLite's qmark style
            connection.exec_driver_sql(f"INSERT INTO {target} VALUES ({marks})", list(values))
        return []
    if dialect.name != "postgresql":
        result = session.execute(insert(table).returning(*returning), rows)
        return [tuple(row) for row in result]
    arrays = [
        bindparam(name, [row[name] for row in rows], type_=ARRAY(table.c[name].type))
        for name in names
    ]
    source = func.unnest(*arrays).table_valued(*names).render_derived()
    statement = insert(table).from_select(names, select(*source.c)).returning(*returning)
    return [tuple(row) for row in session.execute(statement)]


def _bind_values(
    dialect: Dialect, table: Table, names: list[str], rows: list[dict[str, Any]]
) -> Iterator[tuple[Any, ...]]:
    """Each row as a tuple of what the driver is given, as SQLAlchemy itself would bind it."""
    converters: list[Callable[[Any], Any] | None] = []
    for name in names:
        process = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        converters.append(lru_cache(maxsize=4096)(process) if process else None)
    for row in rows:
        yield tuple(
            row[name] if convert is None else convert(row[name])
            for name, convert in zip(names, converters, strict=True)
        )


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision`."""
    with migrating(engine) as connection:
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Undo migrations down to `revision`."""
    with migrating(engine) as connection:
        command.downgrade(alembic_config(connection), revision)


@contextmanager
def migrating(engine: Engine) -> Iterator[Connection]:
    """One transaction for a migration. On SQLite, foreign keys are not enforced meanwhile:
    changing a column of a table that others reference (patients, in revision 0003) means
    rebuilding it (copy, drop, rename), and dropping the old table under the enrolments that
    point at it fails while they are (SQLite's own procedure for such changes turns them off
    first; the pragma does nothing inside a transaction, so it is set before). Every reference
    is checked before the commit, and enforcement is back on for whoever uses the connection
    next."""
    with engine.connect() as connection:
        if engine.dialect.name != "sqlite":
            with connection.begin():
                yield connection
            return
        raw = connection.connection.dbapi_connection
        assert raw is not None
        raw.execute("PRAGMA foreign_keys=OFF")  # autocommit: no transaction has begun
        try:
            with connection.begin():
                yield connection
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    raise DripError(
                        f"the migration would leave {len(broken)} row(s) referring to rows that "
                        f"do not exist (first: table {broken[0][0]}); nothing was changed"
                    )
        finally:
            raw.execute("PRAGMA foreign_keys=ON")


def schema_revision(engine: Engine) -> tuple[str | None, str | None]:
    """(current revision of the database, newest revision shipped)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except OperationalError as e:
        raise DripError(
            f"cannot open the database at {shown_url(engine)}: {e.orig}; start the database "
            "server, or correct DRIP_DATABASE_URL"
        ) from None
    return current, head


def require_current_schema(engine: Engine) -> None:
    """Raise a DripError naming the fix when the schema is missing or older than this code."""
    current, head = schema_revision(engine)
    if current is None:
        raise DripError(
            f"the database at {shown_url(engine)} has no drip tables yet; run `drip db upgrade` "
            "first"
        )
    if current != head:
        raise DripError(
            f"the database schema is at {current}, this drip needs {head}; run `drip db upgrade`"
        )


def clock_offset(engine: Engine, local: Callable[[], datetime] = utcnow) -> timedelta:
    """How far the database's clock is ahead of this host's `local` clock (negative: behind).

    PostgreSQL: `clock_timestamp()` against the midpoint of the local readings before and after,
    the best of three round trips (the error is at most half a round trip). SQLite: zero, by
    construction: the database is a local file, every process using it reads this host's clock.
    """
    if engine.dialect.name == "sqlite":
        return timedelta(0)
    samples: list[tuple[timedelta, timedelta]] = []
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))  # connected before the timing starts
        for _ in range(3):
            before = local()
            theirs = connection.scalar(text("SELECT clock_timestamp()"))
            after = local()
            samples.append((after - before, theirs - (before + (after - before) / 2)))
    return min(samples)[1]


def require_clock_in_step(engine: Engine, local: Callable[[], datetime] = utcnow) -> None:
    """Refuse to run on a host whose clock is off from the database's by more than
    MAX_CLOCK_SKEW: its leases would expire early or late on the other hosts."""
    offset = clock_offset(engine, local)
    if abs(offset) > MAX_CLOCK_SKEW:
        direction = "behind" if offset > timedelta(0) else "ahead of"
        raise ConfigError(
            f"this host's clock ({socket.gethostname()}) is {abs(offset).total_seconds():.1f} s "
            f"{direction} the database's; drip runs only within "
            f"{MAX_CLOCK_SKEW.total_seconds():g} s, so that leases hold across hosts; "
            "sync this host's clock (chrony/ntpd)"
        )


def rowcount(result: Any) -> int:
    """Rows matched by an UPDATE/DELETE (Session.execute is typed as returning a plain Result)."""
    return cast(CursorResult[Any], result).rowcount


def is_unique_violation(error: IntegrityError) -> bool:
    """Whether a statement lost a race for a unique index (another transaction inserted the same
    key first): PostgreSQL's SQLSTATE 23505, SQLite's SQLITE_CONSTRAINT_UNIQUE."""
    orig = error.orig
    return getattr(orig, "sqlstate", None) == "23505" or (
        getattr(orig, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_UNIQUE"
    )
