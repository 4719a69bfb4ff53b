"""Benchmark: enrol patients from one CSV with every delivery planned, on SQLite and PostgreSQL.

    .venv/bin/python bench/enrol_csv.py [--rows 100000] [--db sqlite|postgresql|both]

It writes a realistic CSV into a temp dir, makes a fresh database for each backend, runs
`drip db upgrade`, then times the real `drip enroll --csv FILE --campaign ketamine-onboarding` as a
child process (wall time and the child's peak RSS), checks the row counts and prints a table.
It reports figures; it is not a pass/fail test. Goals (issue "Foundation"): 5,000 patients/s on
SQLite, 3,000/s on PostgreSQL, peak memory under 200 MB.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path

import psycopg
from sqlalchemy import create_engine, text

DRIP = str(Path(sys.executable).with_name("drip"))
CAMPAIGN = "ketamine-onboarding"
STEPS = 8  # steps in the shipped campaign
GOALS = {"sqlite": 5000.0, "postgresql": 3000.0}  # patients per second
MEMORY_GOAL_MB = 200.0
ZONES = [
    *("America/New_York", "America/Chicago", "America/Denver", "America/Los_Angeles"),
    *("America/Phoenix", "Europe/London", ""),  # "": the clinic's zone
]
FIRST = "Ana José Zoë Łukasz Søren Siobhán François Björk Nguyễn Mary-Jane Chloé Jürgen 李 Ólafur"
LAST = "García O'Brien Müller Smith Núñez Kowalczyk Ødegaard Tran Åberg Okafor Wiśniewski Brontë"


def write_csv(path: Path, rows: int, seed: int = 7) -> None:
    """Unique addresses, mixed zones, non-ASCII names; about half with a first session soon."""
    rnd, today = random.Random(seed), date.today()
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["email", "first_name", "last_name", "timezone", "first_session"])
        for i in range(rows):
            first, last = rnd.choice(FIRST.split()), rnd.choice([*LAST.split(), ""])
            roll = rnd.random()
            if roll < 0.5:
                session = ""
            else:
                day = today + timedelta(days=rnd.randint(0, 30))
                at = f"T{rnd.randint(9, 17):02d}:{rnd.choice((0, 15, 30, 45)):02d}"
                session = day.isoformat() + (at if roll < 0.65 else "")
            local = f"patient{i}" + ("+drip" if i % 10 == 0 else "")
            domain = rnd.choice(("example.com", "Example.org", "clinic.example.net"))
            out.writerow([f"{local}@{domain}", first, last, rnd.choice(ZONES), session])


@contextmanager
def database(kind: str, tmp: Path, admin_url: str) -> Iterator[str]:
    """A fresh, empty database URL; a PostgreSQL one is dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'bench.db'}"
        return
    name = f"bench_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run_drip(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Run `drip ARGS`; (wall seconds, child's peak RSS in MB). Raises if it fails."""
    start = time.perf_counter()
    child = subprocess.Popen([DRIP, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"drip {' '.join(args)} exited {child.returncode}:\n{output}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def count(url: str, table: str) -> int:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def bench(kind: str, csv_path: Path, rows: int, tmp: Path, admin_url: str) -> list[str]:
    with database(kind, tmp, admin_url) as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
        env["DRIP_DATABASE_URL"] = url
        run_drip(["db", "upgrade"], env, tmp)
        seconds, peak_mb = run_drip(
            ["enroll", "--csv", str(csv_path), "--campaign", CAMPAIGN], env, tmp
        )
        found = {t: count(url, t) for t in ("patients", "enrolments", "deliveries", "events")}
    expected = {"patients": rows, "enrolments": rows, "deliveries": rows * STEPS, "events": rows}
    if found != expected:
        raise SystemExit(f"{kind}: expected {expected}, found {found}")
    rate = rows / seconds
    met = rate >= GOALS[kind] and peak_mb < MEMORY_GOAL_MB
    return [
        kind,
        f"{rows:,}",
        f"{seconds:.1f}",
        f"{rate:,.0f}",
        f"{peak_mb:.0f}",
        "yes" if met else "no",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get(
            "BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a PostgreSQL database to connect to while creating and dropping bench_<pid>",
    )
    args = parser.parse_args()
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    table = [["db", "rows", "seconds", "patients/s", "peak RSS MB", "goal met"]]
    with tempfile.TemporaryDirectory(prefix="drip-bench-") as name:
        tmp = Path(name)
        csv_path = tmp / "patients.csv"
        write_csv(csv_path, args.rows)
        for kind in kinds:
            table.append(bench(kind, csv_path, args.rows, tmp, args.pg_admin_url))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    goals = ", ".join(f"{k} {v:,.0f}/s" for k, v in GOALS.items())
    print(f"goals: {goals}; peak RSS under {MEMORY_GOAL_MB:.0f} MB (wall time includes start-up)")


if __name__ == "__main__":
    main()
