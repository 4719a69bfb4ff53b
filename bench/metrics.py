"""Benchmark: what one Prometheus scrape of `drip serve`'s /metrics costs at a million deliveries.

    .venv/bin/python bench/metrics.py [--rows 1000000] [--due 2000] [--db sqlite|postgresql|both]
                                      [--repeat 7] [--no-http]

For each database it makes a fresh one (a SQLite file in a temp dir; a PostgreSQL database
`bench_metrics_<pid>`, dropped afterwards), runs `drip db upgrade`, and loads ROWS deliveries
(8 per enrolment, one enrolment per patient) in a mix a clinic has after a while: 85% sent, 10%
scheduled for later, `--due` scheduled and already due (the backlog the ticker has not claimed),
and the rest retry, failed, unknown, skipped, cancelled, claimed; 2% of enrolments paused, 5%
ended; 1,000 suppressions. PostgreSQL then gets `VACUUM ANALYZE` (what autovacuum does after a
load like this); the figures right after the load, before it, are printed too.

Then it times:
- each query of drip.metrics.read_figures on its own, and the whole DatabaseCollector through
  prometheus-client's generate_latest (what a scrape runs), the median of --repeat;
- a real `drip serve --workers 1` answering GET /metrics over HTTP on 127.0.0.1 (--no-http
  skips it), the median of --repeat requests after one warm-up;
and prints the plan of each query (EXPLAIN ANALYZE on PostgreSQL, EXPLAIN QUERY PLAN on SQLite).
It reports figures; it is not a pass/fail test. Results: docs/performance.md, "Metrics".
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy
from sqlalchemy import Engine, text
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from drip import db, metrics  # noqa: E402
from drip.clock import Clock  # noqa: E402
from drip.models import DELIVERIES, ENROLMENTS, PATIENTS, SUPPRESSIONS  # noqa: E402

DRIP = str(Path(sys.executable).with_name("drip"))
NOW = datetime(2026, 12, 1, 18, 0, tzinfo=UTC)
STEPS = 8
CHUNK = 100_000
SECRET = "bench-secret-0123456789abcdefghijklmnop"

# Of every 10,000 rows (spread over the table by a stride, as enrolments over time are).
MIX = [
    (8500, "sent"),
    (9500, "scheduled"),  # for later
    (9530, "retry"),
    (9580, "failed"),
    (9585, "unknown"),
    (9780, "skipped"),
    (9990, "cancelled"),
    (10000, "claimed"),
]


@contextmanager
def database(kind: str, tmp: Path, admin_url: str) -> Iterator[str]:
    """A fresh, empty database URL; a PostgreSQL one is dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'bench.db'}"
        return
    name = f"bench_metrics_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _state(k: int) -> str:
    r = (k * 7919) % 10000
    return next(state for bound, state in MIX if r < bound)


def delivery(k: int, due_ids: set[int]) -> dict[str, Any]:
    state = "scheduled" if k in due_ids else _state(k)
    past = NOW - timedelta(minutes=1 + k % 500_000)
    if state == "scheduled":
        due = (
            NOW - timedelta(seconds=1 + k % 3600)
            if k in due_ids
            else NOW + timedelta(hours=1 + k % 2000)
        )
    elif state == "retry":
        due = NOW + timedelta(minutes=k % 120)
    else:
        due = past
    return {
        "id": k + 1,
        "enrolment_id": k // STEPS + 1,
        "step_key": f"step{k % STEPS}",
        "state": state,
        "due_at": due,
        "expires_at": None,
        "lease_until": NOW + timedelta(minutes=5) if state == "claimed" else None,
        "attempts": 0 if state in ("scheduled", "cancelled") else 1,
        "first_tried_at": past if state not in ("scheduled", "cancelled") else None,
        "last_error": "550 5.1.1 bench" if state == "failed" else None,
        "message_id": f"<{k}@bench.example>" if state not in ("scheduled", "cancelled") else None,
        "sent_at": past if state == "sent" else None,
        "created_at": past,
        "updated_at": past,
    }


def load(engine: Engine, rows: int, due: int) -> None:
    """Patients, enrolments, deliveries and suppressions, in chunks, in one transaction."""
    enrolments = rows // STEPS
    due_ids = set(range(0, rows, max(rows // max(due, 1), 1))[:due]) if due else set()
    with Session(engine) as session, session.begin():
        for start in range(0, enrolments, CHUNK):
            ids = range(start + 1, min(start + CHUNK, enrolments) + 1)
            db.insert_many(session, PATIENTS, [patient(i) for i in ids])
            db.insert_many(session, ENROLMENTS, [enrolment(i) for i in ids])
        for start in range(0, rows, CHUNK):
            chunk = range(start, min(start + CHUNK, rows))
            db.insert_many(session, DELIVERIES, [delivery(k, due_ids) for k in chunk])
        db.insert_many(session, SUPPRESSIONS, [suppression(i) for i in range(1, 1001)])


def patient(i: int) -> dict[str, Any]:
    address = f"p{i}@bench.example"
    return {
        "id": i,
        "email": address,
        "email_key": address,
        "public_id": f"pub{i:019d}",
        "first_name": "P",
        "last_name": None,
        "timezone": "America/New_York",
        "created_at": NOW - timedelta(days=30),
        "unsubscribed_at": None,
        "suppressed_at": None,
        "suppressed_reason": None,
    }


def enrolment(i: int) -> dict[str, Any]:
    status = "paused" if i % 50 == 0 else "ended" if i % 20 == 0 else "active"
    return {
        "id": i,
        "patient_id": i,
        "campaign": "ketamine-onboarding",
        "status": status,
        "enrolled_at": NOW - timedelta(days=30),
        "first_session_on": None,
        "first_session_at": None,
        "paused_at": NOW if status == "paused" else None,
        "ended_at": NOW if status == "ended" else None,
        "ended_reason": "unenrolled" if status == "ended" else None,
    }


def suppression(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "address_hash": f"{i:064x}",
        "key_id": "bench",
        "reason": "bounce 5.1.1",
        "source": "bench",
        "created_at": NOW,
    }


def timed(call: Callable[[], Any], repeat: int) -> float:
    """The median wall time of `repeat` calls, in milliseconds (after one warm-up)."""
    call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


QUERIES = {
    "deliveries by state": (metrics._BY_STATE, {}),
    "due now, oldest due": (metrics._DUE, {"now": NOW}),
    "enrolments by status": (metrics._BY_STATUS, {}),
    "suppressed": (metrics._SUPPRESSED, {}),
}


def literal_sql(statement: Any, params: dict[str, Any], dialect: Any) -> str:
    bound = statement.params(**params) if params else statement
    return str(bound.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def plans(engine: Engine) -> list[str]:
    out: list[str] = []
    postgresql = engine.dialect.name == "postgresql"
    dialect = pg_dialect.dialect() if postgresql else sqlite_dialect.dialect()
    with engine.connect() as connection:
        for name, (statement, params) in QUERIES.items():
            sql = literal_sql(statement, params, dialect)
            if postgresql:
                connection.execute(text("SET jit = off"))  # as drip.db.make_reader sets it
                scan = "off" if statement is metrics._BY_STATE else "on"  # as read_figures does
                connection.execute(text(f"SET enable_seqscan = {scan}"))
                rows = connection.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {sql}").all()
                plan = [row[0] for row in rows]
            else:
                rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}").all()
                plan = [str(row[-1]) for row in rows]
            out.append(f"-- {name}: {' '.join(sql.split())}")
            out.extend(f"   {line}" for line in plan)
    return out


def query_times(reader: Engine, repeat: int) -> dict[str, float]:
    found = {}
    for name, (statement, params) in QUERIES.items():

        def run(statement: Any = statement, params: dict[str, Any] = params) -> None:
            with reader.connect() as connection, connection.begin():
                if statement is metrics._BY_STATE and reader.dialect.name == "postgresql":
                    connection.execute(metrics._INDEX_ONLY)  # as read_figures does
                connection.execute(statement, params).all()

        found[name] = timed(run, repeat)
    return found


def scrape_time(reader: Engine, repeat: int) -> tuple[float, str]:
    registry = metrics.database_registry(reader, Clock(NOW, None, datetime.now(UTC)))
    body = generate_latest(registry).decode()
    return timed(lambda: generate_latest(registry), repeat), body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def http_time(url: str, tmp: Path, repeat: int) -> tuple[float, str]:
    """GET /metrics from a real `drip serve --workers 1`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
    env |= {"DRIP_DATABASE_URL": url, "DRIP_SECRET_KEY": SECRET, "DRIP_NOW": NOW.isoformat()}
    log = (tmp / "serve.log").open("wb")
    server = subprocess.Popen(
        [DRIP, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env,
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(address, timeout=30) as answer:
                    body = answer.read().decode()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"drip serve did not answer:\n{(tmp / 'serve.log').read_text()}"
                    ) from None
                time.sleep(0.1)

        def get() -> None:
            with urllib.request.urlopen(address, timeout=30) as answer:
                answer.read()

        return timed(get, repeat), body
    finally:
        server.terminate()
        server.wait(30)


def check(body: str, rows: int, due: int) -> None:
    """The figures add up: every row counted once, the backlog found."""
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    total = sum(v for (name, _), v in samples.items() if name == "drip_deliveries")
    assert total == rows, (total, rows)
    assert samples[("drip_database_up", ())] == 1
    print(
        f"   drip_due_now {samples[('drip_due_now', ())]:.0f} (about {due} made due, less those "
        f"of paused or ended enrolments); drip_oldest_due_seconds "
        f"{samples[('drip_oldest_due_seconds', ())]:.0f}"
    )


def bench(kind: str, rows: int, due: int, tmp: Path, admin_url: str, args: Any) -> None:
    with database(kind, tmp, admin_url) as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
        subprocess.run([DRIP, "db", "upgrade"], env=env | {"DRIP_DATABASE_URL": url}, cwd=tmp,
                       check=True, capture_output=True)  # fmt: skip
        engine = db.make_engine(url)
        started = time.perf_counter()
        load(engine, rows, due)
        print(f"\n== {kind}: {rows:,} deliveries loaded in {time.perf_counter() - started:.0f} s")
        reader = db.make_reader(url, timeout=60)
        if kind == "postgresql":
            print("-- right after the load (no VACUUM, no ANALYZE yet):")
            report(engine, reader, rows, due, args.repeat, plans_too=False)
            with engine.connect() as connection:
                connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                    "VACUUM ANALYZE"
                )
            print("-- after VACUUM ANALYZE (as autovacuum leaves it):")
        else:
            with engine.begin() as connection:
                connection.exec_driver_sql("ANALYZE")
        report(engine, reader, rows, due, args.repeat, plans_too=True)
        if not args.no_http:
            ms, body = http_time(url, tmp, args.repeat)
            check(body, rows, due)
            print(
                f"   GET /metrics from drip serve over HTTP: {ms:.1f} ms (median of {args.repeat})"
            )
        reader.dispose()
        engine.dispose()


def report(
    engine: Engine, reader: Engine, rows: int, due: int, repeat: int, *, plans_too: bool
) -> None:
    for name, ms in query_times(reader, repeat).items():
        print(f"   {name}: {ms:.1f} ms")
    ms, body = scrape_time(reader, repeat)
    check(body, rows, due)
    print(f"   whole collector (generate_latest): {ms:.1f} ms (median of {repeat})")
    if plans_too:
        print("\n".join(plans(engine)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=2_000, help="rows already due, unclaimed")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-http", action="store_true", help="skip the drip serve timing")
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get(
            "BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    with psycopg.connect(args.pg_admin_url) as c:
        pg_version = c.execute("SHOW server_version").fetchone()
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, PostgreSQL {pg_version[0] if pg_version else '?'}, "
        f"SQLAlchemy {sqlalchemy.__version__}, {datetime.now(UTC):%Y-%m-%d}"
    )
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix="drip-bench-metrics-") as tmp:
            bench(kind, args.rows, args.due, Path(tmp), args.pg_admin_url, args)


if __name__ == "__main__":
    main()
