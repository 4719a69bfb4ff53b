"""The whole engine with real parts: `drip worker` and `drip beat` processes, a real redis-server,
a real SMTP server on loopback, SQLite and PostgreSQL. The calendar is moved with DRIP_NOW_FILE,
which every process reads.

After every scenario, including the faults, the same invariants must hold: nothing is owed,
nothing arrived twice, and the SMTP server holds exactly what the database calls `sent` (plus,
possibly, a message whose send was cut off mid-way, which the database calls `unknown`).

Nothing here depends on the speed of the machine: a fault is injected while the SMTP server holds
a message back (`CapturingServer.hold`), so a process is known to be inside a batch; leases never
run out by themselves (LEASE_SECONDS is long) but when the test moves the calendar past them, and
only once nothing is in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import psutil
import pytest
import redis
from click.testing import Result
from sqlalchemy import Engine, func, select

from drip.broker import EmbeddedRedis, redis_client
from drip.clock import read_clock_file, write_clock_file
from drip.models import Delivery, Enrolment, Patient
from drip.tasks import SEND_QUEUE
from tests.conftest import TEST_SECRET
from tests.polling import wait_until
from tests.smtp_servers import Captured, CapturingServer, Held

pytestmark = pytest.mark.slow
START = datetime(2026, 10, 30, 13, 30, tzinfo=UTC)  # Fri 09:30 in New York
LEASE_SECONDS = 300  # a lease runs out when a test moves the calendar, not on a slow machine
OWED = ("scheduled", "retry", "claimed", "sending")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private, real redis-server for the whole run (the same kind `drip run` starts)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    yield server.start()
    server.stop()


@dataclass
class Pipeline:
    """Starts and stops drip processes against one database, Redis and SMTP server."""

    root: Path
    env: dict[str, str]
    engine: Engine
    smtp: CapturingServer
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def now_file(self) -> Path:
        return Path(self.env["DRIP_NOW_FILE"])

    def now(self) -> datetime:
        return read_clock_file(self.now_file)

    def set_now(self, instant: datetime) -> None:
        write_clock_file(self.now_file, instant)

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{args[0]}-{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "drip", *args],
            env=self.env,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes.append(process)
        return process

    def worker(self, name: str = "w1", concurrency: int = 2) -> subprocess.Popen[bytes]:
        return self.start("worker", f"--name={name}", f"--concurrency={concurrency}")

    def beat(self) -> subprocess.Popen[bytes]:
        return self.start("beat")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_worker(self, worker: subprocess.Popen[bytes]) -> None:
        """Celery's warm shutdown: the batches it is sending finish; then nothing is in flight."""
        worker.terminate()
        assert worker.wait(60) == 0, self.logs()

    def expire_leases(self) -> None:
        """Move the calendar past every lease taken so far."""
        self.set_now(self.now() + timedelta(seconds=LEASE_SECONDS + 1))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.root.glob("*.log"))

    # --- the database's view --------------------------------------------------------------------

    def states(self) -> Counter[str]:
        with self.engine.connect() as c:
            return Counter(
                dict(c.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
            )

    def owed(self) -> int:
        """Rows due by now that are not finished yet."""
        with self.engine.connect() as c:
            return int(
                c.scalar(
                    select(func.count())
                    .select_from(Delivery)
                    .join(Enrolment, Enrolment.id == Delivery.enrolment_id)
                    .where(
                        Delivery.state.in_(OWED),
                        Delivery.due_at <= self.now(),
                        Enrolment.status == "active",
                    )
                )
                or 0
            )

    def next_due(self) -> datetime | None:
        with self.engine.connect() as c:
            return c.scalar(
                select(func.min(Delivery.due_at)).where(
                    Delivery.state.in_(OWED), Delivery.due_at.is_not(None)
                )
            )

    def ids_in(self, *states: str) -> set[int]:
        with self.engine.connect() as c:
            return set(c.scalars(select(Delivery.id).where(Delivery.state.in_(states))))

    def wait_for_messages(self, n: int, timeout: float = 120) -> None:
        try:
            self.smtp.wait_for(n, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; states {self.states()}\n{self.logs()}") from None

    def wait_settled(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.owed():
            if time.monotonic() > deadline:
                raise AssertionError(f"still owed: {self.states()}\n{self.logs()}")
            for process in self.processes:
                assert process.poll() is None or process.returncode in (0, -15, -9), self.logs()
            time.sleep(0.1)

    def walk(self, timeout: float = 120) -> None:
        """Move the calendar from one due time to the next until nothing is left to send."""
        deadline = time.monotonic() + timeout
        while (due := self.next_due()) is not None:
            assert time.monotonic() < deadline, f"{self.states()}\n{self.logs()}"
            if due > self.now():
                self.set_now(due)
            self.wait_settled()

    # --- the invariants ---------------------------------------------------------------------------

    def check_books_balance(self) -> list[Captured]:
        """Nothing owed, nothing twice, and SMTP holds what the database calls sent."""
        messages = self.smtp.messages
        received = Counter(int(_header(m, "X-Drip-Delivery")) for m in messages)
        twice = {i: n for i, n in received.items() if n > 1}
        assert not twice, f"delivered more than once: {twice}"
        message_ids = Counter(_header(m, "Message-ID") for m in messages)
        assert max(message_ids.values(), default=1) == 1, "one Message-ID arrived twice"
        sent, unknown = self.ids_in("sent"), self.ids_in("unknown")
        assert sent <= set(received), f"sent but never received: {sent - set(received)}"
        assert set(received) - sent <= unknown, "received but not recorded as sent or unknown"
        return messages


def _header(message: Captured, name: str) -> str:
    return str(BytesParser(policy=policy.default).parsebytes(message.data, headersonly=True)[name])


def delivery_id(message: Captured) -> int:
    return int(_header(message, "X-Drip-Delivery"))


def holder(worker: subprocess.Popen[bytes], held: Held) -> psutil.Process:
    """The worker's pool process whose SMTP connection is the one waiting for `held`'s reply."""
    owners = [
        child
        for child in psutil.Process(worker.pid).children()
        if any(c.laddr and c.laddr.port == held.peer_port for c in child.net_connections("tcp"))
    ]
    assert len(owners) == 1, f"no single pool process holds port {held.peer_port}: {owners}"
    return owners[0]


@pytest.fixture
def pipeline(db_url: str, redis_url: str, tmp_path: Path, engine: Engine) -> Iterator[Pipeline]:
    redis_client(redis_url).flushall()
    now_file = tmp_path / "now"
    write_clock_file(now_file, START)
    with CapturingServer() as smtp:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
        env = clean | {
            "DRIP_DATABASE_URL": db_url,
            "DRIP_BROKER_URL": redis_url,
            "DRIP_MAIL_URL": f"smtp://127.0.0.1:{smtp.port}?timeout=2",  # fits the short lease
            "DRIP_NOW_FILE": str(now_file),
            "DRIP_SECRET_KEY": TEST_SECRET,
            "DRIP_TICK_SECONDS": "0.2",
            "DRIP_LEASE_SECONDS": str(LEASE_SECONDS),
            "DRIP_BATCH_SIZE": "20",
        }
        line = Pipeline(tmp_path, env, engine, smtp)
        try:
            yield line
        finally:
            line.stop()


def enrol_csv(drip: Callable[..., Result], pipeline: Pipeline, rows: list[str]) -> None:
    body = "email,first_name,timezone,first_session\n" + "".join(f"{r}\n" for r in rows)
    env = {"DRIP_NOW": "", "DRIP_NOW_FILE": pipeline.env["DRIP_NOW_FILE"]}
    result = drip("enroll", "--csv", "-", "--campaign", "ketamine-onboarding", input=body, env=env)
    assert result.exit_code == 0, result.output


def many(n: int) -> list[str]:
    return [f"p{i}@example.com,P{i},America/New_York," for i in range(n)]


def test_walking_the_calendar_every_email_arrives_once_at_its_local_time(
    drip: Callable[..., Result], pipeline: Pipeline
) -> None:
    started = time.monotonic()
    enrol_csv(
        drip,
        pipeline,
        [
            "ana@example.com,Ana,America/New_York,2026-11-04T14:00",
            "zoe@example.com,Zoë,Europe/London,2026-11-05",
            "kenji@example.com,Kenji,America/Los_Angeles,2026-11-03T09:00",
        ],
    )
    pipeline.worker()
    pipeline.beat()
    pipeline.walk()
    # The calendar runs at real speed from each due time the walk moves it to, so an email sent
    # at its due time is at most this late; one put off (to the next window, the next tick of the
    # walk) would be hours late.
    walked = timedelta(seconds=time.monotonic() - started)
    messages = pipeline.check_books_balance()
    assert len(messages) == pipeline.states()["sent"] == 24
    with pipeline.engine.connect() as c:
        zones = dict(c.execute(select(Patient.email, Patient.timezone)).all())
        planned = dict(c.execute(select(Delivery.id, Delivery.due_at)).all())
    for message in messages:
        parsed = BytesParser(policy=policy.default).parsebytes(message.data, headersonly=True)
        local = parsedate_to_datetime(str(parsed["Date"])).astimezone(ZoneInfo(zones[parsed["To"]]))
        assert 9 <= local.hour < 19, f"sent at {local} local time"
        due = planned[int(parsed["X-Drip-Delivery"])]
        late = parsedate_to_datetime(str(parsed["Date"])) - due
        assert timedelta(0) <= late <= walked, f"sent {late} after its due time"
    logs = pipeline.logs()
    assert "drip.send_batch" in logs  # the worker logged its work…
    for personal in ("@example.com", "Ana", "Zoë", "Kenji"):
        assert personal not in logs  # …by delivery id, never naming anyone


def test_sigkill_of_the_worker_process_inside_a_batch_loses_and_repeats_nothing(
    drip: Callable[..., Result], pipeline: Pipeline
) -> None:
    enrol_csv(drip, pipeline, many(60))  # three batches of 20
    pipeline.smtp.hold()  # the first message's reply is held back: its sender is inside a batch
    worker = pipeline.worker(concurrency=1)
    pipeline.beat()
    (held,) = pipeline.smtp.wait_held(1)
    victim = delivery_id(held.message)
    assert pipeline.ids_in("sending") == {victim}, "marked `sending` before its body went out"
    assert pipeline.ids_in("claimed"), "the rest of its batch is waiting behind it"
    process = holder(worker, held)
    process.send_signal(signal.SIGKILL)
    process.wait(60)
    pipeline.smtp.release()
    pipeline.stop_worker(worker)  # what the next pool process took on is finished
    assert pipeline.ids_in("sending") == {victim}  # only the killed send is left in the air
    pipeline.expire_leases()
    pipeline.worker()
    pipeline.wait_settled()
    messages = pipeline.check_books_balance()
    assert pipeline.ids_in("unknown") == {victim}  # never resent automatically
    assert pipeline.states()["sent"] == 59  # the rest of its batch came back, once each
    others = Counter(delivery_id(m) for m in messages if delivery_id(m) != victim)
    assert len(others) == 59 and set(others.values()) == {1}


def test_flushall_mid_run_loses_nothing(
    drip: Callable[..., Result], pipeline: Pipeline, redis_url: str
) -> None:
    enrol_csv(drip, pipeline, many(200))
    pipeline.smtp.hold()  # the run cannot finish before Redis is wiped
    worker = pipeline.worker()
    pipeline.beat()
    pipeline.smtp.wait_held(1)
    client = redis_client(redis_url)
    assert client.llen(SEND_QUEUE), "batches are waiting in Redis…"
    client.flushall()  # …and now they are gone
    pipeline.smtp.release()
    pipeline.stop_worker(worker)
    assert not pipeline.ids_in("sending")
    pipeline.expire_leases()
    pipeline.worker()
    pipeline.wait_settled()
    pipeline.check_books_balance()
    assert pipeline.states()["sent"] == 200


def test_killing_and_restarting_the_ticker_loses_and_repeats_nothing(
    drip: Callable[..., Result], pipeline: Pipeline
) -> None:
    enrol_csv(drip, pipeline, many(150))
    pipeline.smtp.hold()  # the run cannot finish before the ticker dies
    pipeline.worker()
    ticker = pipeline.beat()
    pipeline.smtp.wait_held(1)
    ticker.send_signal(signal.SIGKILL)
    ticker.wait()
    assert pipeline.owed()  # mid-run
    pipeline.smtp.release()
    pipeline.beat()
    pipeline.wait_settled()
    pipeline.check_books_balance()
    assert pipeline.states()["sent"] == 150


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_two_tickers_and_two_worker_nodes_at_once(
    drip: Callable[..., Result], pipeline: Pipeline
) -> None:
    enrol_csv(
        drip,
        pipeline,
        [f"p{i}@example.com,P{i},America/New_York,2026-11-0{2 + i % 5}" for i in range(120)],
    )
    pipeline.worker("w1")
    pipeline.worker("w2")
    pipeline.beat()
    pipeline.beat()
    pipeline.walk(timeout=180)
    messages = pipeline.check_books_balance()
    assert len(messages) == pipeline.states()["sent"] == 120 * 8


def test_the_private_redis_is_real_and_answers(redis_url: str) -> None:
    client: redis.Redis = redis_client(redis_url)
    assert client.ping() and client.info()["redis_version"]


def test_a_daily_limit_of_5_sends_exactly_5_and_leaves_the_rest_scheduled_untried(
    drip: Callable[..., Result], pipeline: Pipeline
) -> None:
    enrol_csv(drip, pipeline, many(12))  # twelve welcome emails due at once
    pipeline.env["DRIP_DAILY_LIMIT"] = "5"
    worker = pipeline.worker()
    pipeline.beat()
    pipeline.wait_for_messages(5)
    # the ticker has seen the quota spent, several ticks after the fifth email
    wait_until(
        lambda: pipeline.logs().count("'daily_spent': True") >= 3,
        "ticks that find the daily quota spent",
        describe=pipeline.logs,
    )
    pipeline.stop_worker(worker)
    assert len(pipeline.check_books_balance()) == 5
    with pipeline.engine.connect() as c:
        welcome = c.execute(
            select(Delivery.state, Delivery.attempts, Delivery.last_error).where(
                Delivery.step_key == "welcome"
            )
        ).all()
    assert sorted(state for state, _, _ in welcome) == ["scheduled"] * 7 + ["sent"] * 5
    assert {(a, e) for s, a, e in welcome if s == "scheduled"} == {(0, None)}
