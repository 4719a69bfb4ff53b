"""Micro-benchmark: the cost of one durable per-email commit on SQLite, synchronous=NORMAL vs FULL.

    .venv/bin/python bench/commit_sync.py [--commits 5000] [--rounds 3] [--dir DIR]

What the sender does once per email (sending._EmailCommit), on the raw sqlite3 connection with
drip's own pragmas (db.make_engine: WAL, busy timeout): BEGIN IMMEDIATE, two conditional
one-row UPDATEs by primary key (the previous email `sending` -> `sent`, the next `claimed` ->
`sending`), COMMIT. The database is a file in DIR (by
default a temp dir under the current directory, so on this machine's disk, not a tmpfs). Rounds
alternate NORMAL and FULL on the same file; it prints the median µs per commit of each and the
difference. It reports figures; it is not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA busy_timeout=30000")
    raw.execute(f"PRAGMA synchronous={synchronous}")
    return raw


def prepare(path: Path, rows: int) -> None:
    raw = connect(path, "NORMAL")
    raw.execute(
        "CREATE TABLE deliveries (id INTEGER PRIMARY KEY, state TEXT NOT NULL, "
        "attempts INTEGER NOT NULL, updated_at TEXT NOT NULL)"
    )
    raw.execute("BEGIN")
    raw.executemany(
        "INSERT INTO deliveries VALUES (?, 'claimed', 0, '2026-12-01 00:00:00')",
        [(i,) for i in range(1, rows + 1)],
    )
    raw.execute("COMMIT")
    raw.close()


def per_commit_us(path: Path, synchronous: str, commits: int) -> float:
    raw = connect(path, synchronous)
    raw.execute("UPDATE deliveries SET state = 'claimed'")  # the previous round's rows back
    statement = (
        "UPDATE deliveries SET state = ?, attempts = attempts + 1, updated_at = ? "
        "WHERE id = ? AND state || '' = ?"
    )
    now = "2026-12-01 10:00:00.000000"
    started = time.perf_counter()
    for row in range(1, commits + 1):
        raw.execute("BEGIN IMMEDIATE")
        raw.execute(statement, ("sent", now, row - 1, "sending"))
        raw.execute(statement, ("sending", now, row, "claimed"))
        raw.execute("COMMIT")
    elapsed = time.perf_counter() - started
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the next round starts from the same WAL
    raw.close()
    return elapsed / commits * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-commit-", dir=args.dir) as tmp:
        path = Path(tmp) / "drip.db"
        prepare(path, args.commits)
        results: dict[str, list[float]] = {"NORMAL": [], "FULL": []}
        for _ in range(args.rounds):
            for synchronous, figures in results.items():
                figures.append(per_commit_us(path, synchronous, args.commits))
    print(
        f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} cores, "
        f"{args.commits} commits x {args.rounds} rounds, database in {args.dir.resolve()}"
    )
    medians = {name: statistics.median(figures) for name, figures in results.items()}
    for name, figures in results.items():
        shown = ", ".join(f"{f:.0f}" for f in figures)
        print(f"synchronous={name:6} median {medians[name]:8.1f} µs/commit  (rounds: {shown})")
    extra = medians["FULL"] - medians["NORMAL"]
    print(f"FULL costs {extra:.1f} µs more per commit ({medians['FULL'] / medians['NORMAL']:.1f}x)")


if __name__ == "__main__":
    main()
