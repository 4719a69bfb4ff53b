"""Benchmark: DRIP_RATE_LIMIT and DRIP_DAILY_LIMIT across three worker nodes (issue 11).

    .venv/bin/python bench/ratelimit.py [--emails 600] [--rate 20] [--daily 50]
                                        [--daily-emails 200] [--db sqlite|postgresql]

In one run, three `python -m drip worker --concurrency 2` processes with distinct names (w1, w2,
w3), one `python -m drip beat` (the default 5 s tick), one private Redis, the SMTP sink of
bench/send.py (which notes when it accepts each message), a fresh database each time:

  rate   DRIP_RATE_LIMIT=20, 600 welcome emails due at once. Reported: emails/s from the first
         message accepted to the last (goal: within 10% of 20/s) and end to end; the most
         messages the sink accepted in any one-second window (sliding, to the microsecond; goal:
         no more than 20 + one take's turns, which is 1 at this rate, and at worst 20 + one batch
         of 100 rows); nothing sent twice. The limiter's own schedule never holds more than 20
         turns in a second (tests/test_ratelimit.py); at the sink, a send delayed by a busy
         machine can land next to the following one.
  daily  DRIP_DAILY_LIMIT=50, 200 welcome emails due at once. Once the sink has 50, the bench
         waits for three ticks that find the quota spent, then checks: the sink has exactly 50,
         the database 50 `sent`, and the other 150 rows exactly as they were when they became
         due (`scheduled`, attempts 0, no error, no lease, `updated_at` unchanged).

It reports figures; it is not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feed import pipeline  # noqa: E402
from send import _load, versions  # noqa: E402

from drip.broker import EmbeddedRedis  # noqa: E402
from drip.ratelimit import chunk_for  # noqa: E402

NODES = [("w1", 2), ("w2", 2), ("w3", 2)]


def most_in_a_second(times: list[float]) -> int:
    """The most instants in any half-open window [t, t + 1 s)."""
    ordered, most, first = sorted(times), 0, 0
    for last, instant in enumerate(ordered):
        while ordered[first] <= instant - 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def rate_run(args: argparse.Namespace, tmp: Path, broker_url: str) -> list[str]:
    env = {"DRIP_RATE_LIMIT": f"{args.rate:g}"}
    with pipeline(args.db, tmp, args.pg_admin_url, broker_url, args.emails, env) as line:
        line.start(NODES)
        due_at = line.make_due(args.emails)
        line.wait_for(args.emails)
        times = line.accepted_times(args.emails)
        found = line.settled(args.emails)
        stats = line.sink.stats()
    going = (len(times) - 1) / (times[-1] - times[0])
    whole = len(times) / (times[-1] - due_at)
    most, allowed = most_in_a_second(times), args.rate + chunk_for(args.rate)
    batch = args.rate + 100  # DRIP_BATCH_SIZE's default: the looser reading of "one batch"
    off = going / args.rate - 1
    lines = [
        f"rate: {args.emails} emails, DRIP_RATE_LIMIT={args.rate:g}, three nodes",
        f"  going out {going:.2f} emails/s ({off:+.1%} of {args.rate:g}; goal within 10%: "
        f"{'met' if abs(off) <= 0.10 else 'NOT met'}); end to end {whole:.2f}/s "
        f"(first email {times[0] - due_at:.2f} s after the due commit)",
        f"  most in any one-second window: {most} (<= {allowed:g}, the rate and one take's "
        f"turns: {'met' if most <= allowed else 'NOT met'}; <= {batch:g}, the rate and one "
        f"batch of rows: {'met' if most <= batch else 'NOT met'})",
        f"  database {found}; sink {stats}",
    ]
    if stats["distinct"] != args.emails or stats["duplicates"]:
        lines.append("  PROBLEM: the sink did not see each email once")
    return lines


def daily_run(args: argparse.Namespace, tmp: Path, broker_url: str) -> list[str]:
    env = {"DRIP_DAILY_LIMIT": str(args.daily)}
    emails = args.daily_emails
    with pipeline(args.db, tmp, args.pg_admin_url, broker_url, emails, env) as line:
        line.start(NODES)
        before = {row[0]: row for row in line.delivery_rows()}
        line.make_due(args.daily)
        line.wait_for(args.daily)
        spent = sum(t.count("'daily_spent': True") for t in line.texts())
        line.wait_until(
            lambda: sum(t.count("'daily_spent': True") for t in line.texts()) >= spent + 3,
            timeout=120,
        )
        found = line.settled(args.daily)
        after = line.delivery_rows()
        stats = line.sink.stats()
    waiting = [row for row in after if row[1] != "sent"]
    untouched = [
        row
        for row in waiting
        if row[1:5] == ("scheduled", 0, None, None) and row[5] == before[row[0]][5]
    ]
    ok = stats["accepted"] == args.daily and len(untouched) == emails - args.daily
    return [
        f"daily: {emails} emails, DRIP_DAILY_LIMIT={args.daily}, three nodes",
        f"  sink accepted {stats['accepted']} (distinct {stats['distinct']}); database {found}",
        f"  rows not sent: {len(waiting)}, of which untouched (scheduled, attempts 0, no error, "
        f"no lease, updated_at as at the due commit): {len(untouched)}",
        f"  goal (stops at {args.daily}, the rest wait untouched): {'met' if ok else 'NOT met'}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--emails", type=int, default=600)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--daily", type=int, default=50)
    parser.add_argument("--daily-emails", type=int, default=200)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get(
            "BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="drip-bench-ratelimit-"))
    redis_server = EmbeddedRedis(tmp / "var")
    try:
        broker_url = redis_server.start()
        print(f"machine: {versions(broker_url)}; load average {_load()} at the start", flush=True)
        report = rate_run(args, tmp, broker_url)
        print("\n".join(report), flush=True)
        report = daily_run(args, tmp, broker_url)
        print("\n".join(report), flush=True)
        print(f"load average {_load()} at the end")
    finally:
        redis_server.stop()
        if os.environ.get("BENCH_KEEP_TMP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
