"""Benchmark: what `drip status` asks the database, at a million delivery rows.

    .venv/bin/python bench/status.py [--rows 1000000] [--db sqlite|postgresql|both]

Fills a fresh database of each kind with `rows` deliveries (eight per patient) in the mix of a
clinic that has run drip for a while: most rows sent over the last 30 days, some planned ahead,
a backlog of due ones, a few failed, unknown, skipped and cancelled, some of paused enrolments.
Then it times each of status's queries (drip.status.deliveries, the median of five runs) and, on
PostgreSQL, prints each plan (EXPLAIN ANALYZE) so one can see which index answers it. It
reports figures; it is not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.commit import database, drop  # noqa: E402
from drip import db, status  # noqa: E402
from drip.models import DELIVERIES, ENROLMENTS, PATIENTS  # noqa: E402

NOW = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
STEPS = ["welcome", "plan", "medications", "before", "after", "cost", "check-in", "next"]
CHUNK = 20_000  # patients per transaction


def fill(engine: Engine, rows: int, rng: random.Random) -> None:
    patients = rows // len(STEPS)
    for start in range(0, patients, CHUNK):
        with db.transaction(engine) as session:
            _fill_chunk(session, range(start, min(start + CHUNK, patients)), rng)
    with engine.connect() as c:
        if engine.dialect.name == "postgresql":
            c.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
        else:
            c.execute(text("ANALYZE"))
            c.commit()


def _fill_chunk(session: Session, numbers: range, rng: random.Random) -> None:
    people = [
        {"email": f"p{i}@example.com", "email_key": f"p{i}@example.com", "first_name": "P",
         "last_name": None, "timezone": "America/New_York", "created_at": NOW}
        for i in numbers
    ]  # fmt: skip
    ids = [p for (p,) in db.insert_many(session, PATIENTS, people, PATIENTS.c.id)]
    enrolments = [
        {"patient_id": p, "campaign": "ketamine-onboarding",
         "status": "paused" if rng.random() < 0.02 else "active", "enrolled_at": NOW}
        for p in ids
    ]  # fmt: skip
    e_ids = [e for (e,) in db.insert_many(session, ENROLMENTS, enrolments, ENROLMENTS.c.id)]
    db.insert_many(session, DELIVERIES, list(_deliveries(e_ids, rng)))


def _deliveries(enrolments: list[int], rng: random.Random) -> Iterator[dict[str, Any]]:
    for enrolment in enrolments:
        for step in STEPS:
            state, due, sent = _mix(rng)
            yield {
                "enrolment_id": enrolment, "step_key": step, "state": state, "due_at": due,
                "expires_at": None, "lease_until": None, "attempts": int(sent is not None),
                "first_tried_at": sent, "last_error": None, "message_id": None,
                "sent_at": sent, "created_at": NOW - timedelta(days=30),
                "updated_at": sent or due,
            }  # fmt: skip


def _mix(rng: random.Random) -> tuple[str, datetime, datetime | None]:
    """(state, due_at, sent_at) in a running clinic's proportions."""
    roll = rng.random()
    past = NOW - timedelta(seconds=rng.uniform(0, 30 * 86400))
    if roll < 0.84:
        return "sent", past, past + timedelta(seconds=rng.uniform(0, 30))
    if roll < 0.95:
        return "scheduled", NOW + timedelta(seconds=rng.uniform(0, 30 * 86400)), None
    if roll < 0.96:  # a backlog: due in the last hour
        return "scheduled", NOW - timedelta(seconds=rng.uniform(0, 3600)), None
    states = ("failed", "unknown", "skipped", "cancelled", "retry")
    return states[int((roll - 0.96) / 0.008) % len(states)], past, None


def measure(engine: Engine, explain: bool) -> list[tuple[str, float, str]]:
    """(query, median ms, plan) for each statement status runs."""
    ran: list[tuple[str, Any]] = []

    def capture(_c: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        ran.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    with Session(engine) as session:
        status.deliveries(session, now=NOW)
    event.remove(engine, "before_cursor_execute", capture)
    results = []
    with engine.connect() as c:
        for statement, parameters in ran:
            times = []
            for _ in range(5):
                started = time.perf_counter()
                c.exec_driver_sql(statement, parameters).all()
                times.append((time.perf_counter() - started) * 1000)
            plan = ""
            if explain:
                lines = c.exec_driver_sql(f"EXPLAIN (ANALYZE, COSTS OFF) {statement}", parameters)
                plan = "\n".join("    " + line for (line,) in lines)
            results.append((" ".join(statement.split())[:90], statistics.median(times), plan))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    print(f"{args.rows:,} deliveries, {os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            url, name = database(kind, Path(tmp))
            engine = db.make_engine(url)
            try:
                db.upgrade(engine)
                started = time.perf_counter()
                fill(engine, args.rows, random.Random(1))
                print(f"\n{kind}: filled in {time.perf_counter() - started:.0f} s")
                for query, ms, plan in measure(engine, explain=kind == "postgresql"):
                    print(f"{ms:8.1f} ms  {query}")
                    if plan:
                        print(plan)
            finally:
                engine.dispose()
                if name:
                    drop(name)


if __name__ == "__main__":
    main()
