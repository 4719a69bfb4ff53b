"""Benchmark: the ticker feeds what the workers drain, whatever DRIP_TICK_SECONDS (issue 11).

    .venv/bin/python bench/feed.py [--emails 20000] [--db sqlite|postgresql] [--concurrency 2]
                                   [--code DIR]

In one run, the same worker (`python -m drip worker --concurrency 2`, `python -m drip beat`, a
private Redis, the SMTP sink of bench/send.py, a fresh database each time) sends N due welcome
emails twice:

  defaults   DRIP_TICK_SECONDS and DRIP_BATCH_SIZE unset (5 s, 100)
  fast tick  DRIP_TICK_SECONDS=0.2 (what bench/send.py uses)
  tick S s   with --slow-tick S: DRIP_TICK_SECONDS=S, which is what the default tick is on a
             machine S/5 times faster (fixed claims per tick show as a cap at once)

Each run starts cold: Redis is emptied first, so nothing measured before helps. For each it
reports emails/s from the first message accepted to the N-th (the rate they go out at), and from
the commit that makes the N rows due (end to end: that includes waiting up to one tick for the
first claim), and the longest pause between two messages accepted (a queue that ran dry shows
as a pause of up to one tick). Goal: defaults at least 0.8 of the fast tick. With --repeat R
each configuration runs R times, alternating (A B B A ..., so a change in the machine's load
falls on both alike), and the medians are compared. Afterwards the database must say N `sent`
and the sink must have seen N distinct delivery ids. `--code DIR` runs the drip package in DIR
instead (e.g. a checkout of the code before), for a before/after. It reports figures; it is
not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent))

from send import (  # noqa: E402
    CAMPAIGN,
    FROM,
    SECRET,
    T0,
    Processes,
    Sink,
    _load,
    database,
    engine_for,
    run_drip_command,
    set_welcome_due,
    states,
    versions,
    welcome_ids,
    write_csv,
)

from drip.broker import EmbeddedRedis, redis_client  # noqa: E402
from drip.models import Delivery  # noqa: E402

GOAL = 0.8


@dataclass
class Run:
    label: str
    emails: int
    due_at: float  # perf_counter of the commit that made the rows due
    times: list[float]  # perf_counter of each message accepted, in order
    found: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def going(self) -> float:
        """Emails/s from the first accepted to the last."""
        span = self.times[-1] - self.times[0]
        return (len(self.times) - 1) / span if span > 0 else float("inf")

    @property
    def end_to_end(self) -> float:
        """Emails/s from the due commit to the last accepted."""
        return len(self.times) / (self.times[-1] - self.due_at)

    @property
    def longest_pause(self) -> float:
        """The longest time between two messages accepted: the workers starved (or stalled)."""
        return max(b - a for a, b in zip(self.times, self.times[1:], strict=False))

    @property
    def first_after(self) -> float:
        return self.times[0] - self.due_at


class Pipeline:
    """A fresh database with N patients whose welcome email is held back, a sink, and the drip
    processes started on demand; stop() ends them all."""

    def __init__(
        self, kind: str, url: str, broker_url: str, tmp: Path, emails: int, env: dict[str, str]
    ) -> None:
        self.kind, self.emails, self.tmp = kind, emails, tmp
        self.engine = engine_for(url)
        self.sink = Sink(keep_times=emails)
        self.processes = Processes()
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("DRIP_", "BENCH_"))}
        self.env = (
            clean
            | {
                "DRIP_DATABASE_URL": url,
                "DRIP_BROKER_URL": broker_url,
                "DRIP_MAIL_URL": f"smtp://127.0.0.1:{self.sink.port}",
                "DRIP_SECRET_KEY": SECRET,
                "DRIP_FROM": FROM,
                "PYTHONUNBUFFERED": "1",
            }
            | env
        )
        self.logs: list[Path] = []

    def prepare(self) -> None:
        run_drip_command(["db", "upgrade"], self.env, self.tmp)
        csv_path = self.tmp / "patients.csv"
        write_csv(csv_path, self.emails)
        run_drip_command(
            ["enroll", "--csv", str(csv_path), "--campaign", CAMPAIGN],
            self.env | {"DRIP_NOW": T0.isoformat()},
            self.tmp,
        )
        if len(welcome_ids(self.engine)) != self.emails:
            raise SystemExit(f"{self.kind}: expected {self.emails} welcome rows")
        set_welcome_due(self.engine, T0 + timedelta(days=2))  # held back while processes start
        # the processes' calendar starts a minute after T0 (13:01 in New York) and runs on
        self.env["DRIP_NOW"] = (T0 + timedelta(minutes=1)).isoformat()

    def start(self, workers: list[tuple[str, int]]) -> None:
        """`drip worker` nodes (name, concurrency), then `drip beat`; returns once a worker has
        run a tick (nothing is due yet)."""
        for name, concurrency in workers:
            log = self.tmp / f"worker-{name}.log"
            argv = [sys.executable, "-m", "drip", "worker", "--name", name]
            self.processes.start(
                f"worker {name}",
                argv + ["--concurrency", str(concurrency)],
                self.env,
                self.tmp,
                log,
            )
            self.logs.append(log)
        for log in self.logs:
            self.wait_for_log(log, " ready.")
        beat = self.tmp / "beat.log"
        self.processes.start(
            "beat", [sys.executable, "-m", "drip", "beat"], self.env, self.tmp, beat
        )
        self.wait_until(
            lambda: any("Task drip.tick[" in t and "succeeded" in t for t in self.texts())
        )

    def make_due(self, expect: int) -> float:
        self.sink.expect(expect)
        if set_welcome_due(self.engine, T0) != self.emails:
            raise SystemExit(f"{self.kind}: could not make {self.emails} rows due")
        return time.perf_counter()

    def wait_for(self, count: int, timeout: float = 900) -> None:
        self.sink.wait_for(count, timeout=timeout, alive=self.processes.check)

    def accepted_times(self, count: int) -> list[float]:
        return [float(self.sink.times[i]) for i in range(count)]

    def settled(self, count: int) -> dict[str, int]:
        """The states once `count` rows are `sent` (the last commit may trail the sink)."""
        deadline = time.monotonic() + 60
        found = states(self.engine)
        while found.get("sent", 0) < count and time.monotonic() < deadline:
            time.sleep(0.1)
            found = states(self.engine)
        return found

    def texts(self) -> list[str]:
        return [p.read_text(errors="replace") for p in self.logs if p.exists()]

    def wait_for_log(self, path: Path, needle: str, timeout: float = 60) -> None:
        self.wait_until(
            lambda: path.exists() and needle in path.read_text(errors="replace"), timeout
        )

    def wait_until(self, condition: object, timeout: float = 60) -> None:
        assert callable(condition)
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting; logs in {self.tmp}")
            self.processes.check()
            time.sleep(0.05)

    def delivery_rows(self) -> list[tuple[object, ...]]:
        d = Delivery
        query = select(d.id, d.state, d.attempts, d.last_error, d.lease_until, d.updated_at)
        with self.engine.connect() as connection:
            return [tuple(r) for r in connection.execute(query.where(d.step_key == "welcome"))]

    def stop(self) -> None:
        self.processes.stop()
        self.sink.stop()
        self.engine.dispose()


@contextmanager
def pipeline(
    kind: str, tmp: Path, pg_admin: str, broker_url: str, emails: int, env: dict[str, str]
) -> Iterator[Pipeline]:
    """A Pipeline on a fresh database and an emptied Redis (nothing measured before helps)."""
    redis_client(broker_url).flushall()
    folder = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=tmp))
    with database(kind, folder, pg_admin) as url:
        line = Pipeline(kind, url, broker_url, folder, emails, env)
        try:
            line.prepare()
            yield line
        finally:
            line.stop()


def run_once(
    label: str, kind: str, tmp: Path, args: argparse.Namespace, broker_url: str, env: dict[str, str]
) -> Run:
    with pipeline(kind, tmp, args.pg_admin_url, broker_url, args.emails, env) as line:
        line.start([("bench", args.concurrency)])
        due_at = line.make_due(args.emails)
        line.wait_for(args.emails)
        run = Run(label, args.emails, due_at, line.accepted_times(args.emails))
        run.found = line.settled(args.emails)
        stats = line.sink.stats()
    if run.found.get("sent", 0) != args.emails:
        run.problems.append(f"database states {run.found}, expected {args.emails} sent")
    if stats["distinct"] != args.emails or stats["duplicates"]:
        run.problems.append(f"sink saw {stats}")
    return run


def median(runs: list[Run]) -> Run:
    """The run with the median rate going out (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r.going)[(len(runs) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--emails", type=int, default=20000)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--code", type=Path, help="run the drip package in this checkout")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration")
    parser.add_argument(
        "--slow-tick",
        type=float,
        help="a third configuration with this DRIP_TICK_SECONDS (a machine this many times faster)",
    )
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get(
            "BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    extra = {"PYTHONPATH": str(args.code.resolve())} if args.code else {}
    tmp = Path(tempfile.mkdtemp(prefix="drip-bench-feed-"))
    redis_server = EmbeddedRedis(tmp / "var")
    try:
        broker_url = redis_server.start()
        print(f"machine: {versions(broker_url)}; load average {_load()} at the start", flush=True)
        print(
            f"code: {args.code or 'this checkout'}; {args.emails} emails on {args.db}", flush=True
        )
        configs: list[tuple[str, dict[str, str]]] = [
            ("defaults", {}),
            ("fast tick", {"DRIP_TICK_SECONDS": "0.2"}),
        ]
        if args.slow_tick:
            configs.append(
                (f"tick {args.slow_tick:g}s", {"DRIP_TICK_SECONDS": f"{args.slow_tick:g}"})
            )
        runs: dict[str, list[Run]] = {label: [] for label, _ in configs}
        for i in range(args.repeat):
            for label, env in configs if i % 2 == 0 else configs[::-1]:
                print(f"{label} (run {len(runs[label]) + 1})…", flush=True)
                run = run_once(label, args.db, tmp, args, broker_url, env | extra)
                print(f"  {run.going:,.0f} emails/s going out; load {_load()}", flush=True)
                runs[label].append(run)
        print(f"load average {_load()} at the end\n")
        print(
            f"{'':10} {'emails/s going out':>19} {'end to end':>11} {'first email after':>18}"
            f" {'longest pause':>14}"
        )
        for r in (r for label, _ in configs for r in runs[label]):
            print(
                f"{r.label:10} {r.going:19,.0f} {r.end_to_end:11,.0f} {r.first_after:17.2f}s"
                f" {r.longest_pause:13.2f}s"
            )
            for problem in r.problems:
                print(f"  PROBLEM {r.label}: {problem}")
        defaults, fast = (median(runs[label]) for label, _ in configs[:2])
        going, whole = defaults.going / fast.going, defaults.end_to_end / fast.end_to_end
        print(
            f"\nmedians, defaults / fast tick: {going:.2f} going out, {whole:.2f} end to end "
            f"(goal >= {GOAL}: {'met' if going >= GOAL else 'NOT met'})"
        )
    finally:
        redis_server.stop()
        with suppress(Exception):
            if os.environ.get("BENCH_KEEP_TMP"):
                print(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
