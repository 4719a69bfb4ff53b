"""Benchmark: sending, end to end, from "due" to "accepted by an SMTP server", beside two baselines.

    .venv/bin/python bench/send.py [--emails 5000] [--db sqlite|postgresql|both] [--repeat 3]
                                   [--naive-emails N | --skip-naive] [--concurrency 2]

Three pipelines deliver the same N emails to a minimal local SMTP sink (its own process, asyncio,
about 50-90 µs of CPU per message):

  ceiling  the bare ceiling: N messages built beforehand (drip.messages.build_message from one
           rendered email), sent by two processes over one reused smtplib connection each.
  drip     the real thing: a fresh database, `drip db upgrade`, `drip enroll --csv` (N welcome
           emails, held back while the processes start), then `python -m drip worker
           --concurrency 2` and `python -m drip beat` on a private Redis (DRIP_TICK_SECONDS=0.2,
           DRIP_BATCH_SIZE=100). The clock starts once the worker is ready and has run a tick, at
           the commit that makes the N rows due; it stops when the sink accepts the N-th message.
           The database must then say N `sent`, and the sink must have seen N distinct
           X-Drip-Delivery values (nothing sent twice).
  naive    one Celery task per email (ids only; a throwaway app defined here, a real worker with
           concurrency 2): load the row, Jinja2 + premailer for every email, email.message,
           a new SMTP connection per message, one UPDATE.

Peak RSS of every worker process (the Celery main process and its pool children) is sampled every
0.2 s with psutil; the CPU time of every process involved is reported per email. With --repeat the
ceiling and drip run that many times (drip on a fresh database each time) and the median run is
shown. It prints a table and whether the goals hold (drip at least half the ceiling, every worker
process under 150 MB). It reports figures; it is not a pass/fail test.

Knobs for investigating: BENCH_TICK_SECONDS, BENCH_BATCH_SIZE (default 0.2 and 100);
BENCH_PYSPY=DIR records each pool process with py-spy (pip install py-spy) while sending;
BENCH_KEEP_TMP=1 keeps the temp dir with the worker and beat logs.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import multiprocessing
import os
import platform
import random
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import psutil
import psycopg
from celery import Celery
from sqlalchemy import Engine, create_engine, func, select, text, update

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from drip.campaigns import Campaign, load_campaign  # noqa: E402
from drip.messages import build_message, make_message_id  # noqa: E402
from drip.models import SCHEDULED, SENT, Delivery, Enrolment, Patient  # noqa: E402
from drip.rendering import Renderer  # noqa: E402
from drip.settings import Settings  # noqa: E402

CAMPAIGN = "ketamine-onboarding"
STEP = "welcome"  # offset 0d: due the moment a patient is enrolled inside the send window
# 13:00 in New York; every zone below is inside the default 09:00-19:00 window at this instant.
T0 = datetime(2026, 12, 1, 18, 0, tzinfo=UTC)
ZONES = ["America/New_York", "America/Chicago", "America/Denver", "America/Los_Angeles", ""]
FIRST = "Ana José Zoë Łukasz Søren Siobhán François Björk Nguyễn Mary-Jane Chloé Jürgen 李 Ólafur"
LAST = "García O'Brien Müller Smith Núñez Kowalczyk Ødegaard Tran Åberg Okafor Wiśniewski Brontë"
SECRET = "bench-secret-key-not-for-production"
FROM = "Lakeside Wellness Clinic (demo) <care@clinic.example>"
ENVELOPE_FROM = "care@clinic.example"
CEILING_SHARE_GOAL = 0.5
WORKER_RSS_GOAL_MB = 150.0
NAIVE_QUEUE = "bench.naive"
NAIVE_TASK = "bench.naive_send"
RSS_INTERVAL = 0.2


# --- the SMTP sink ------------------------------------------------------------------------------

# Shared counters, written by the sink process only (TARGET by the bench, before a run).
ACCEPTED, DISTINCT, DUPLICATES, WITHOUT_ID, TARGET = range(5)
_DELIVERY_HEADER = b"\nX-Drip-Delivery:"


class _SinkSession(asyncio.Protocol):
    """One SMTP session: 220 / EHLO (PIPELINING, 8BITMIME) / MAIL / RCPT / DATA … CRLF.CRLF / 250
    / RSET / NOOP / QUIT; XSTAT answers the counters. Replies to pipelined commands go out in one
    write. The only work per message is two bytes.find calls and a set lookup."""

    def __init__(
        self, counters: Any, seen: set[bytes], done_at: Any, done: Any, times: Any = None
    ) -> None:
        self.counters, self.seen, self.times = counters, seen, times
        self.done_at, self.done = done_at, done
        self.buffer = bytearray()
        self.in_data = False
        self.scan = 0  # where to resume looking for CRLF.CRLF
        self.has_mail = False
        self.recipients = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(b"220 sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buffer = self.buffer
        buffer += data
        replies: list[bytes] = []
        position = 0
        closing = False
        while True:
            if self.in_data:
                if buffer.startswith(b".\r\n", position):  # an empty message
                    end, after = position, position + 3
                else:
                    found = buffer.find(b"\r\n.\r\n", max(self.scan, position))
                    if found < 0:
                        self.scan = max(len(buffer) - 4, position)
                        break
                    end, after = found + 2, found + 5
                self._accept(buffer, position, end)
                replies.append(b"250 2.0.0 OK\r\n")
                position, self.in_data = after, False
                self.has_mail, self.recipients = False, 0
                continue
            found = buffer.find(b"\r\n", position)
            if found < 0:
                break
            line = bytes(buffer[position:found])
            position = found + 2
            verb = line[:4].upper()
            if verb == b"DATA":
                if not self.recipients:
                    replies.append(b"503 5.5.1 RCPT first\r\n")
                    continue
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data, self.scan = True, position
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
                closing = True
                break
            else:
                replies.append(self._command(verb, line))
        if position:
            del buffer[:position]
            self.scan = max(self.scan - position, 0)
        if replies:
            self.transport.write(b"".join(replies))
        if closing:
            self.transport.close()

    def _command(self, verb: bytes, line: bytes) -> bytes:
        if verb == b"MAIL":
            if not line[5:10].upper() == b"FROM:":
                return b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
            self.has_mail, self.recipients = True, 0
            return b"250 2.1.0 OK\r\n"
        if verb == b"RCPT":
            if not self.has_mail:
                return b"503 5.5.1 MAIL first\r\n"
            if not line[5:8].upper() == b"TO:":
                return b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
            self.recipients += 1
            return b"250 2.1.5 OK\r\n"
        if verb == b"EHLO":
            return b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        if verb == b"HELO":
            return b"250 sink\r\n"
        if verb == b"RSET":
            self.has_mail, self.recipients = False, 0
            return b"250 2.0.0 OK\r\n"
        if verb == b"NOOP":
            return b"250 2.0.0 OK\r\n"
        if verb == b"XSTA":
            c = self.counters
            return b"250 accepted=%d distinct=%d duplicates=%d without_id=%d\r\n" % (
                c[ACCEPTED],
                c[DISTINCT],
                c[DUPLICATES],
                c[WITHOUT_ID],
            )
        return b"500 5.5.2 Command unrecognised\r\n"

    def _accept(self, buffer: bytearray, start: int, end: int) -> None:
        counters = self.counters
        head_end = buffer.find(b"\r\n\r\n", start, end)
        if head_end < 0:
            head_end = end
        if buffer.startswith(_DELIVERY_HEADER[1:], start):  # the first header
            found = start - 1
        else:
            found = buffer.find(_DELIVERY_HEADER, start, head_end + 1)
        if found < 0:
            counters[WITHOUT_ID] += 1
        else:
            value_end = buffer.find(b"\r", found, head_end + 2)
            key = bytes(buffer[found + len(_DELIVERY_HEADER) : value_end]).strip()
            if key in self.seen:
                counters[DUPLICATES] += 1
            else:
                self.seen.add(key)
                counters[DISTINCT] += 1
        accepted = counters[ACCEPTED] + 1
        times = self.times
        if times is not None and accepted <= len(times):
            times[accepted - 1] = time.perf_counter()  # when the n-th message was accepted
        counters[ACCEPTED] = accepted  # last: once ACCEPTED reads N, the others are final
        if accepted == counters[TARGET]:
            self.done_at.value = time.perf_counter()  # CLOCK_MONOTONIC: the same in every process
            self.done.set()


def _sink_main(counters: Any, done_at: Any, done: Any, port_pipe: Pipe, times: Any = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def serve() -> None:
        seen: set[bytes] = set()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _SinkSession(counters, seen, done_at, done, times),
            "127.0.0.1",
            0,
            backlog=512,
        )
        port_pipe.send(server.sockets[0].getsockname()[1])
        port_pipe.close()
        await server.serve_forever()

    asyncio.run(serve())


class Sink:
    """The SMTP sink in its own process. The counters are shared memory; the sink notes the
    moment it accepts the message that makes `expect(n)`'s n, so nobody polls while sending."""

    def __init__(self, keep_times: int = 0) -> None:
        """`keep_times`: note when each of the first so many messages was accepted (`times`)."""
        self.counters: Any = multiprocessing.RawArray("q", 5)
        self.times: Any = multiprocessing.RawArray("d", keep_times) if keep_times else None
        self.done_at: Any = multiprocessing.RawValue("d", 0.0)
        self.done = multiprocessing.Event()
        receive, send = multiprocessing.Pipe(duplex=False)
        self.process = multiprocessing.Process(
            target=_sink_main,
            args=(self.counters, self.done_at, self.done, send, self.times),
            name="smtp-sink",
            daemon=True,
        )
        self.process.start()
        send.close()
        if not receive.poll(10):
            raise SystemExit("the SMTP sink did not start")
        self.port: int = receive.recv()
        receive.close()

    @property
    def accepted(self) -> int:
        return int(self.counters[ACCEPTED])

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {
            "accepted": c[ACCEPTED],
            "distinct": c[DISTINCT],
            "duplicates": c[DUPLICATES],
            "without_id": c[WITHOUT_ID],
        }

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def expect(self, count: int) -> None:
        """Note the moment the sink has accepted `count` messages in all (call before sending)."""
        self.done.clear()
        self.counters[TARGET] = count
        if self.counters[ACCEPTED] >= count:
            raise SystemExit(f"the sink already has {self.stats()}")

    def wait_for(self, count: int, *, timeout: float, alive: Callable[[], None]) -> float:
        """Block until `count` messages were accepted (see expect); the time.perf_counter() of
        that moment. `alive` is called every second and should raise if a process we rely on
        died."""
        assert self.counters[TARGET] == count, "call expect(count) before sending"
        deadline = time.perf_counter() + timeout
        while not self.done.wait(1.0):
            alive()
            if time.perf_counter() > deadline:
                raise SystemExit(f"timed out: the sink has {self.stats()} of {count}")
        return float(self.done_at.value)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# --- (a) the bare ceiling ------------------------------------------------------------------------


def _bare_sender(port: int, messages: list[tuple[str, bytes]], barrier: Any) -> None:
    smtp = smtplib.SMTP("127.0.0.1", port, "bench.local", timeout=60)
    assert smtp.sock is not None
    smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    smtp.ehlo()
    barrier.wait()
    for recipient, message in messages:
        smtp.sendmail(ENVELOPE_FROM, [recipient], message)
    smtp.quit()


def run_ceiling(emails: int, settings: Settings) -> Result:
    renderer = Renderer(settings)
    campaign = load_campaign(settings.templates_dir, CAMPAIGN)
    link = "http://127.0.0.1:8025/unsubscribe/1.abcdefghijklmnopqrstuv"
    rendered = renderer.render(
        campaign, STEP, {"first_name": "Zoë", "last_name": "Müller", "unsubscribe_url": link}
    )
    now = datetime.now(UTC)
    messages = [
        (
            f"patient{i}@example.com",
            build_message(
                rendered,
                to=f"patient{i}@example.com",
                from_address=FROM,
                message_id=make_message_id(FROM),
                date=now,
                unsubscribe_url=link,
                delivery_id=i + 1,
            ),
        )
        for i in range(emails)
    ]
    size = len(messages[0][1])
    sink = Sink()
    senders: list[multiprocessing.Process] = []
    try:
        barrier = multiprocessing.Barrier(3)
        halves = [messages[: emails // 2], messages[emails // 2 :]]
        for half in halves:
            process = multiprocessing.Process(target=_bare_sender, args=(sink.port, half, barrier))
            process.start()
            senders.append(process)
        sink.expect(emails)
        cpu_before = sink.cpu_seconds()
        barrier.wait(30)
        start = time.perf_counter()

        def alive() -> None:
            for p in senders:
                if p.exitcode not in (None, 0):
                    raise SystemExit(f"a ceiling sender exited {p.exitcode}")

        end = sink.wait_for(emails, timeout=600, alive=alive)
        sink_cpu = sink.cpu_seconds() - cpu_before
        for p in senders:
            p.join(30)
        stats = sink.stats()
    finally:
        for p in senders:
            if p.is_alive():
                p.kill()
                p.join()
        sink.stop()
    checks = []
    if stats["distinct"] != emails or stats["duplicates"]:
        checks.append(f"sink saw {stats}")
    return Result(
        "ceiling",
        "-",
        emails,
        end - start,
        notes=f"{size / 1024:.1f} KB/message; sink CPU {sink_cpu / emails * 1e6:.0f} µs/message",
        problems=checks,
    )


# --- processes, memory ---------------------------------------------------------------------------


@dataclass
class Result:
    pipeline: str
    db: str
    emails: int
    seconds: float
    worker_rss_mb: dict[str, float] = field(default_factory=dict)  # process label -> peak MB
    notes: str = ""
    problems: list[str] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)  # emails/s of every repeat, when repeated
    peak_rss_mb: float = 0.0  # the highest worker RSS over every repeat

    @property
    def rate(self) -> float:
        return self.emails / self.seconds


def median_run(runs: list[Result]) -> Result:
    """The run with the median rate (the lower middle one for an even count), carrying every
    run's rate, the highest RSS and the problems of all of them."""
    ordered = sorted(runs, key=lambda r: r.rate)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.runs = [r.rate for r in runs]
    chosen.peak_rss_mb = max(max(r.worker_rss_mb.values(), default=0.0) for r in runs)
    chosen.problems = [p for r in runs for p in r.problems]
    return chosen


class RssMonitor(threading.Thread):
    """Samples the RSS of each root process and all its descendants every RSS_INTERVAL."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.roots: dict[str, int] = {}
        self.peaks: dict[tuple[str, int], float] = {}
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def watch(self, label: str, pid: int) -> None:
        with self._lock:
            self.roots[label] = pid

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(RSS_INTERVAL)

    def sample(self) -> None:
        with self._lock:
            roots = dict(self.roots)
        for label, pid in roots.items():
            try:
                root = psutil.Process(pid)
                family = [(label, root)] + [
                    (f"{label} child", child) for child in root.children(recursive=True)
                ]
            except psutil.Error:
                continue
            for name, process in family:
                try:
                    mb = process.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                key = (name, process.pid)
                self.peaks[key] = max(self.peaks.get(key, 0.0), mb)

    def stop(self) -> dict[str, float]:
        self._stop_event.set()
        self.join(5)
        self.sample()
        return {f"{name} {pid}": mb for (name, pid), mb in sorted(self.peaks.items())}


class Processes:
    """Child processes in their own sessions; stop() ends each process group, however we got
    there."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, label: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Any:
        with log.open("ab") as out:
            child = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children.append((label, child))
        return child

    def check(self) -> None:
        for label, child in self.children:
            if child.poll() is not None:
                raise SystemExit(f"{label} exited with {child.returncode} before the end")

    def stop(self) -> None:
        for _, child in self.children:
            if child.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, child in self.children:
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            with suppress(ProcessLookupError):  # the pool children, if the parent left them
                os.killpg(child.pid, signal.SIGKILL)
            if child.poll() is None:
                child.wait()
        self.children.clear()


def wait_for_log(path: Path, needle: str, timeout: float, check: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        check()
        time.sleep(0.05)
    raise SystemExit(f"{needle!r} did not appear in {path} within {timeout:.0f} s")


def run_drip_command(args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "drip", *args], env=env, cwd=cwd, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"drip {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout


# --- databases -----------------------------------------------------------------------------------


@contextmanager
def database(kind: str, tmp: Path, admin_url: str) -> Iterator[str]:
    """A fresh, empty database URL; a PostgreSQL one is dropped afterwards, whatever happens."""
    if kind == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="sqlite-", dir=tmp))
        try:
            yield f"sqlite:///{folder / 'bench-send.db'}"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    name = f"bench_send_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def engine_for(url: str) -> Engine:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def write_csv(path: Path, rows: int, seed: int = 11) -> None:
    """Unique ASCII addresses, non-ASCII names, zones that are all inside the window at T0, no
    first session (so the welcome email is the only one due)."""
    rnd = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["email", "first_name", "last_name", "timezone", "first_session"])
        for i in range(rows):
            first, last = rnd.choice(FIRST.split()), rnd.choice([*LAST.split(), ""])
            out.writerow([f"patient{i}@example.com", first, last, rnd.choice(ZONES), ""])


def welcome_ids(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(
            connection.scalars(
                select(Delivery.id).where(Delivery.step_key == STEP).order_by(Delivery.id)
            )
        )


def states(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(Delivery.state, func.count()).group_by(Delivery.state)
        ).all()
    return {state: int(n) for state, n in rows}


def set_welcome_due(engine: Engine, due: datetime) -> int:
    with engine.begin() as connection:
        changed = connection.execute(
            update(Delivery)
            .where(Delivery.step_key == STEP, Delivery.state == SCHEDULED)
            .values(due_at=due)
        )
        return int(changed.rowcount)


def _profile(worker_pid: int, kind: str) -> list[subprocess.Popen[bytes]]:
    """With BENCH_PYSPY=DIR: py-spy records each pool process (collapsed stacks) while sending."""
    folder = os.environ.get("BENCH_PYSPY")
    if not folder:
        return []
    spy = str(Path(sys.executable).with_name("py-spy"))
    children = psutil.Process(worker_pid).children()
    profilers = [
        subprocess.Popen(
            [spy, "record", "--pid", str(child.pid), "--rate", "250", "--format", "raw", "--idle"]
            + ["--output", f"{folder}/{kind}-{child.pid}.txt", "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for child in children
    ]
    time.sleep(1)  # py-spy attaches
    return profilers


# --- (drip) end to end ---------------------------------------------------------------------------


def base_env(url: str, broker_url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DRIP_", "BENCH_"))}
    return env | {
        "DRIP_DATABASE_URL": url,
        "DRIP_BROKER_URL": broker_url,
        "DRIP_MAIL_URL": f"smtp://127.0.0.1:{port}",
        "DRIP_SECRET_KEY": SECRET,
        "DRIP_FROM": FROM,
        "DRIP_TICK_SECONDS": os.environ.get("BENCH_TICK_SECONDS", "0.2"),
        "DRIP_BATCH_SIZE": os.environ.get("BENCH_BATCH_SIZE", "100"),
        "PYTHONUNBUFFERED": "1",
    }


class CpuMeter:
    """CPU time (user + system) that groups of processes spend from now until per_email()."""

    def __init__(self, groups: dict[str, list[psutil.Process]]) -> None:
        self.groups = groups
        self.before = {label: self._seconds(ps) for label, ps in groups.items()}
        self.wall = time.perf_counter()

    @staticmethod
    def _seconds(processes: list[psutil.Process]) -> float:
        total = 0.0
        for process in processes:
            with suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def per_email(self, emails: int) -> str:
        wall = time.perf_counter() - self.wall
        spent = {
            label: self._seconds(ps) - self.before[label] for label, ps in self.groups.items() if ps
        }
        parts = [f"{label} {seconds / emails * 1e6:.0f}" for label, seconds in spent.items()]
        total = sum(spent.values())
        parts.append(
            f"total {total / emails * 1e6:.0f} ({total / wall / (os.cpu_count() or 1):.0%}"
            " of the machine)"
        )
        return ", ".join(parts)


def _postgres_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]


def run_drip(
    kind: str, emails: int, url: str, broker_url: str, tmp: Path, redis_pid: int, concurrency: int
) -> Result:
    tmp = Path(tempfile.mkdtemp(prefix=f"drip-{kind}-", dir=tmp))  # this run's logs and var/
    engine = engine_for(url)
    sink = Sink()
    processes = Processes()
    monitor = RssMonitor()
    try:
        env = base_env(url, broker_url, sink.port)
        run_drip_command(["db", "upgrade"], env, tmp)
        csv_path = tmp / "patients.csv"
        write_csv(csv_path, emails)
        enrol_started = time.perf_counter()
        run_drip_command(
            ["enroll", "--csv", str(csv_path), "--campaign", CAMPAIGN],
            env | {"DRIP_NOW": T0.isoformat()},
            tmp,
        )
        enrol_seconds = time.perf_counter() - enrol_started
        ids = welcome_ids(engine)
        if len(ids) != emails:
            raise SystemExit(f"{kind}: expected {emails} welcome rows, found {len(ids)}")
        # Hold the welcome emails back while the worker starts: due in two days.
        set_welcome_due(engine, T0 + timedelta(days=2))
        # The processes' calendar starts a minute after T0 (13:01 in New York) and runs on.
        run_env = env | {"DRIP_NOW": (T0 + timedelta(minutes=1)).isoformat()}
        worker_log, beat_log = tmp / f"worker-{kind}.log", tmp / f"beat-{kind}.log"
        worker = processes.start(
            "drip worker",
            [sys.executable, "-m", "drip", "worker", "--concurrency", str(concurrency)]
            + ["--name", "bench"],
            run_env,
            tmp,
            worker_log,
        )
        monitor.watch("drip worker", worker.pid)
        monitor.start()
        wait_for_log(worker_log, " ready.", 60, processes.check)
        beat = processes.start(
            "drip beat", [sys.executable, "-m", "drip", "beat"], run_env, tmp, beat_log
        )
        monitor.watch("drip beat", beat.pid)
        # beat is up and a worker process has run a tick (its engine made, nothing due yet).
        wait_for_log(worker_log, "Task drip.tick[", 60, processes.check)
        wait_for_log(worker_log, "succeeded", 60, processes.check)
        profilers = _profile(worker.pid, kind)
        meter = CpuMeter(
            {
                "worker pool": psutil.Process(worker.pid).children(recursive=True),
                "worker main": [psutil.Process(worker.pid)],
                "beat": [psutil.Process(beat.pid)],
                "redis": [psutil.Process(redis_pid)],
                "sink": [psutil.Process(sink.process.pid)],
                "bench": [psutil.Process()],
                "postgres": _postgres_processes() if kind == "postgresql" else [],
            }
        )
        sink.expect(emails)
        if set_welcome_due(engine, T0) != emails:  # committed: from now on they are due
            raise SystemExit(f"{kind}: could not make {emails} rows due")
        start = time.perf_counter()
        end = sink.wait_for(emails, timeout=900, alive=processes.check)
        cpu = meter.per_email(emails)
        for profiler in profilers:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        seconds = end - start
        deadline = time.monotonic() + 60
        found = states(engine)
        while found.get(SENT, 0) < emails and time.monotonic() < deadline:
            time.sleep(0.1)
            found = states(engine)
        stats = sink.stats()
        rss = monitor.stop()
    finally:
        with suppress(Exception):
            monitor.stop()
        processes.stop()
        sink.stop()
        engine.dispose()
    problems = []
    if found.get(SENT, 0) != emails:
        problems.append(f"database states {found}, expected {emails} sent")
    if stats["distinct"] != emails or stats["duplicates"] or stats["accepted"] != emails:
        problems.append(f"sink saw {stats}")
    workers = {k: v for k, v in rss.items() if k.startswith("drip worker")}
    others = {k: v for k, v in rss.items() if not k.startswith("drip worker")}
    beat_mb = max(others.values(), default=0.0)
    return Result(
        "drip",
        kind,
        emails,
        seconds,
        worker_rss_mb=workers,
        notes=f"enrol {enrol_seconds:.1f} s; beat RSS {beat_mb:.0f} MB; CPU µs/email: {cpu}",
        problems=problems,
    )


# --- (b) the naive pipeline ----------------------------------------------------------------------

# A throwaway Celery app: one task per email. The worker imports this module as `send`
# (PYTHONPATH=bench/) and is configured from BENCH_NAIVE_* variables.
naive = Celery("bench_naive")
naive.conf.update(
    broker_url=os.environ.get("BENCH_NAIVE_BROKER_URL", "memory://"),
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue=NAIVE_QUEUE,
    broker_connection_retry_on_startup=True,
)


class _NaiveState:
    engine: Engine | None = None
    settings: Settings | None = None
    renderer: Renderer | None = None
    campaign: Campaign | None = None


@naive.task(name=NAIVE_TASK)
def naive_send(delivery_id: int) -> None:
    state = _NaiveState
    if state.engine is None:
        state.settings = Settings.from_env()
        state.engine = create_engine(
            state.settings.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
        )
        state.renderer = Renderer(state.settings)
        state.campaign = load_campaign(state.settings.templates_dir, CAMPAIGN)
    assert state.settings and state.renderer and state.campaign
    settings = state.settings
    with state.engine.connect() as connection:
        row = connection.execute(
            select(Patient.id, Patient.email, Patient.first_name, Patient.last_name)
            .join(Enrolment, Enrolment.patient_id == Patient.id)
            .join(Delivery, Delivery.enrolment_id == Enrolment.id)
            .where(Delivery.id == delivery_id)
        ).one()
    link = f"{settings.public_url}/unsubscribe/{row.id}.naive"
    rendered = state.renderer.render_reference(  # Jinja2, then premailer, for every email
        state.campaign,
        STEP,
        {"first_name": row.first_name, "last_name": row.last_name or "", "unsubscribe_url": link},
    )
    message = EmailMessage()
    message["From"] = settings.from_address
    message["To"] = row.email
    message["Subject"] = rendered.subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain="clinic.example")
    message["List-Unsubscribe"] = f"<{link}>"
    message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message["X-Drip-Delivery"] = str(delivery_id)
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    host, _, port = settings.mail_url.removeprefix("smtp://").partition(":")
    with smtplib.SMTP(host, int(port), timeout=60) as smtp:  # a new connection per message
        smtp.send_message(message)
    with state.engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE deliveries SET state = 'sent', message_id = :mid, sent_at = :now, "
                "updated_at = :now WHERE id = :id"
            ),
            {
                "mid": message["Message-ID"],
                "now": datetime.now(UTC).replace(tzinfo=None),
                "id": delivery_id,
            },
        )


def run_naive(kind: str, emails: int, url: str, broker_url: str, tmp: Path) -> Result:
    tmp = Path(tempfile.mkdtemp(prefix=f"naive-{kind}-", dir=tmp))  # this run's logs
    engine = engine_for(url)
    ids = welcome_ids(engine)[:emails]
    engine.dispose()
    sink = Sink()
    processes = Processes()
    monitor = RssMonitor()
    try:
        env = base_env(url, broker_url, sink.port) | {
            "BENCH_NAIVE_BROKER_URL": broker_url,
            "PYTHONPATH": str(Path(__file__).resolve().parent),
        }
        log = tmp / f"naive-{kind}.log"
        worker = processes.start(
            "naive worker",
            [
                *(sys.executable, "-m", "celery", "-A", "send:naive", "worker"),
                *("--concurrency", "2", "--queues", NAIVE_QUEUE, "--hostname", "naive@%h"),
                "--loglevel",
                "INFO",
            ],
            env,
            tmp,
            log,
        )
        monitor.watch("naive worker", worker.pid)
        monitor.start()
        wait_for_log(log, " ready.", 60, processes.check)
        naive.conf.broker_url = broker_url
        sink.expect(len(ids))
        start = time.perf_counter()
        with naive.producer_or_acquire() as producer:
            for delivery_id in ids:
                naive.send_task(
                    NAIVE_TASK, args=[delivery_id], queue=NAIVE_QUEUE, producer=producer
                )
        end = sink.wait_for(len(ids), timeout=1800, alive=processes.check)
        stats = sink.stats()
        rss = monitor.stop()
    finally:
        with suppress(Exception):
            monitor.stop()
        processes.stop()
        sink.stop()
    problems = []
    if stats["distinct"] != len(ids) or stats["duplicates"]:
        problems.append(f"sink saw {stats}")
    return Result("naive", kind, len(ids), end - start, worker_rss_mb=rss, problems=problems)


# --- report --------------------------------------------------------------------------------------


def versions(broker_url: str) -> str:
    import redis

    from drip.broker import redis_client

    client: redis.Redis = redis_client(broker_url)
    redis_version = client.info("server")["redis_version"]
    client.close()
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, Redis {redis_version} (private)"
    )


def pg_version(admin_url: str) -> str:
    with psycopg.connect(admin_url) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return f"PostgreSQL {row[0] if row else '?'}"


def report(results: list[Result], ceiling: Result) -> None:
    header = ["pipeline", "db", "emails", "seconds", "emails/s", "x ceiling", "worker peak RSS MB"]
    rows = [header]
    for r in results:
        peak = max(r.worker_rss_mb.values(), default=0.0)
        count = len(r.worker_rss_mb)
        peak = max(peak, r.peak_rss_mb)
        rows.append(
            [
                r.pipeline,
                r.db,
                f"{r.emails:,}",
                f"{r.seconds:.2f}",
                f"{r.rate:,.0f}",
                f"{r.rate / ceiling.rate:.2f}",
                f"{peak:.0f} (max of {count})" if count else "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print()
    for r in results:
        if len(r.runs) > 1:
            rates = ", ".join(f"{rate:,.0f}" for rate in r.runs)
            print(f"{r.pipeline} {r.db}: median of {len(r.runs)} runs ({rates} emails/s)")
        if r.notes:
            print(f"{r.pipeline} {r.db}: {r.notes}")
        for label, mb in r.worker_rss_mb.items():
            print(f"  {r.pipeline} {r.db} {label}: {mb:.0f} MB")
        for problem in r.problems:
            print(f"  PROBLEM {r.pipeline} {r.db}: {problem}")
    print()
    for r in results:
        if r.pipeline != "drip":
            continue
        share = r.rate / ceiling.rate
        peak = max(max(r.worker_rss_mb.values(), default=0.0), r.peak_rss_mb)
        ok_rate = share >= CEILING_SHARE_GOAL
        ok_rss = peak < WORKER_RSS_GOAL_MB
        print(
            f"goal {r.db}: drip {share:.2f} x ceiling (>= {CEILING_SHARE_GOAL}: "
            f"{'met' if ok_rate else 'NOT met'}); every worker process < {WORKER_RSS_GOAL_MB:.0f}"
            f" MB (peak {peak:.0f}: {'met' if ok_rss else 'NOT met'})"
            + ("" if not r.problems else "; CHECKS FAILED")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--emails", type=int, default=5000)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--naive-emails", type=int, help="emails for the naive pipeline")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of the ceiling and of drip; the median is shown"
    )
    parser.add_argument(
        "--concurrency", type=int, default=2, help="pool processes of the drip worker (default 2)"
    )
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get(
            "BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a PostgreSQL database to connect to while creating and dropping bench_send_<pid>",
    )
    args = parser.parse_args()
    if args.emails < 2 or args.repeat < 1 or args.concurrency < 1:
        parser.error("--emails must be at least 2, --repeat and --concurrency at least 1")
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    naive_emails = min(args.naive_emails or args.emails, args.emails)
    from drip.broker import EmbeddedRedis

    tmp = Path(tempfile.mkdtemp(prefix="drip-bench-send-"))
    redis_server = EmbeddedRedis(tmp / "var")
    try:
        broker_url = redis_server.start()
        assert redis_server.process is not None
        redis_pid = redis_server.process.pid
        settings = Settings(secret_key=SECRET, from_address=FROM)
        print(f"machine: {versions(broker_url)}", flush=True)
        if "postgresql" in kinds:
            print(f"         {pg_version(args.pg_admin_url)}", flush=True)
        print(f"         load average {_load()} at the start", flush=True)
        runs = []
        for i in range(args.repeat):
            print(f"ceiling: {args.emails} emails (run {i + 1})…", flush=True)
            runs.append(run_ceiling(args.emails, settings))
            print(f"  {runs[-1].rate:,.0f} emails/s ({runs[-1].notes})", flush=True)
        ceiling = median_run(runs)
        results = [ceiling]
        for kind in kinds:
            runs = []
            for i in range(args.repeat):
                with database(kind, tmp, args.pg_admin_url) as url:
                    print(f"drip {kind}: {args.emails} emails (run {i + 1})…", flush=True)
                    runs.append(
                        run_drip(
                            kind, args.emails, url, broker_url, tmp, redis_pid, args.concurrency
                        )
                    )
                    print(f"  {runs[-1].rate:,.0f} emails/s", flush=True)
                    if i == args.repeat - 1 and not args.skip_naive:
                        results.append(median_run(runs))
                        print(f"naive {kind}: {naive_emails} emails…", flush=True)
                        result = run_naive(kind, naive_emails, url, broker_url, tmp)
                        print(f"  {result.rate:,.0f} emails/s", flush=True)
                        results.append(result)
            if args.skip_naive:
                results.append(median_run(runs))
        print(f"load average {_load()} at the end")
        report(results, ceiling)
    finally:
        redis_server.stop()
        if os.environ.get("BENCH_KEEP_TMP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
