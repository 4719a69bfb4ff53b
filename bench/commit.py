"""Benchmark: the sender's per-email commit, its fast path beside the general one.

    .venv/bin/python bench/commit.py [--emails 3000] [--db sqlite|postgresql|both]

Each email costs one commit that records the previous message `sent` and marks the next row
`sending` (drip.states' RECORD_SENT and MARK_SENDING). The sender runs it as SQL compiled once
from those statements, on the driver's connection (drip.sending._EmailCommit); the general path
runs the same two statements through SQLAlchemy (`connection.begin()`, two `execute`s, commit).
This measures both, per email, on a fresh database of each kind with N claimed rows, and prints
microseconds per email and the ratio. It reports figures; it is not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, create_engine, text

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from drip import db, states  # noqa: E402
from drip.models import CLAIMED, DELIVERIES, ENROLMENTS, PATIENTS  # noqa: E402
from drip.patients import new_public_id  # noqa: E402
from drip.sending import _EmailCommit  # noqa: E402

NOW = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)


def fill(engine: Engine, n: int) -> list[int]:
    """N patients, each with one enrolment and one claimed delivery due now."""
    with db.transaction(engine) as session:
        patients = [
            {"email": f"p{i}@example.com", "email_key": f"p{i}@example.com", "first_name": "P",
             "public_id": new_public_id(),
             "last_name": None, "timezone": "America/New_York", "created_at": NOW}
            for i in range(n)
        ]  # fmt: skip
        ids = [pid for (pid,) in db.insert_many(session, PATIENTS, patients, PATIENTS.c.id)]
        enrolments = [
            {"patient_id": p, "campaign": "c", "status": "active", "enrolled_at": NOW}
            for p in ids
        ]
        e_ids = [eid for (eid,) in db.insert_many(session, ENROLMENTS, enrolments, ENROLMENTS.c.id)]
        rows = [
            {"enrolment_id": e, "step_key": "welcome", "state": CLAIMED, "due_at": NOW,
             "attempts": 0, "lease_until": NOW + LEASE, "created_at": NOW, "updated_at": NOW}
            for e in e_ids
        ]  # fmt: skip
        return [d for (d,) in db.insert_many(session, DELIVERIES, rows, DELIVERIES.c.id)]


def mark(delivery_id: int) -> dict[str, object]:
    return states.mark_sending_params(delivery_id, NOW, f"<{delivery_id}@b>", now=NOW, lease=LEASE)


def fast(engine: Engine, ids: list[int]) -> float:
    with engine.connect() as connection:
        commit = _EmailCommit(connection)
        started = time.perf_counter()
        previous = None
        for delivery_id in ids:
            commit.commit(previous, mark(delivery_id))
            previous = delivery_id
        elapsed = time.perf_counter() - started
        commit.close()
    return elapsed


def general(engine: Engine, ids: list[int]) -> float:
    with engine.connect() as connection:
        started = time.perf_counter()
        previous = None
        for delivery_id in ids:
            with connection.begin():
                if previous is not None:
                    connection.execute(states.RECORD_SENT, {"sent_id": previous, "now": NOW})
                connection.execute(states.MARK_SENDING, mark(delivery_id))
            previous = delivery_id
        elapsed = time.perf_counter() - started
    return elapsed


def database(kind: str, tmp: Path) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{tmp / f'{uuid.uuid4().hex}.db'}", None
    admin = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"drip_bench_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin.replace("postgresql://", "postgresql+psycopg://", 1),
                           isolation_level="AUTOCOMMIT")  # fmt: skip
    with engine.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin.rsplit("/", 1)[0] + f"/{name}", name


def drop(name: str) -> None:
    admin = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    engine = create_engine(admin.replace("postgresql://", "postgresql+psycopg://", 1),
                           isolation_level="AUTOCOMMIT")  # fmt: skip
    with engine.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def measure(kind: str, n: int, tmp: Path) -> tuple[float, float]:
    results = []
    for path in (fast, general):
        url, name = database(kind, tmp)
        engine = db.make_engine(url)
        try:
            db.upgrade(engine)
            ids = fill(engine, n)
            results.append(path(engine, ids) / n * 1e6)
        finally:
            engine.dispose()
            if name:
                drop(name)
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=3000)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    print(f"{args.emails} emails per path, {os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d}")
    print(f"{'database':<12} {'fast µs/email':>14} {'general µs/email':>17} {'general/fast':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            f, g = measure(kind, args.emails, Path(tmp))
            print(f"{kind:<12} {f:>14.0f} {g:>17.0f} {g / f:>13.2f}")


if __name__ == "__main__":
    main()
