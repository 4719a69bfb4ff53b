"""The whole engine with real parts: `drip worker` and `drip beat` processes, a real redis-server,
a real SMTP server on loopback, SQLite and PostgreSQL. The calendar is moved with DRIP_NOW_FILE,
which every process reads.

After every scenario, including the faults, the same invariants must hold: nothing is owed,
nothing arrived twice, and the SMTP server holds exactly what the database calls `sent` (plus,
possibly, a message whose send was cut off mid-way, which the database calls `unknown`).
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
from tests.conftest import TEST_SECRET
from tests.smtp_servers import Captured, CapturingServer

pytestmark = pytest.mark.slow
START = datetime(2026, 10, 30, 13, 30, tzinfo=UTC)  # Fri 09:30 in New York
LEASE_SECONDS = 10
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
        sent, unknown = self.ids_in("sent"), self.ids_in("unknown")
        assert sent <= set(received), f"sent but never received: {sent - set(received)}"
        assert set(received) - sent <= unknown, "received but not recorded as sent or unknown"
        return messages


def _header(message: Captured, name: str) -> str:
    return str(BytesParser(policy=policy.default).parsebytes(message.data, headersonly=True)[name])


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
        assert (
            timedelta(0) <= parsedate_to_datetime(str(parsed["Date"])) - due < timedelta(seconds=30)
        ), "sent at its due time"
    logs = pipeline.logs()
    assert "drip.send_batch" in logs  # the worker logged its work…
    for personal in ("@example.com", "Ana", "Zoë", "Kenji"):
        assert personal not in logs  # …by delivery id, never naming anyone


def test_sigkill_of_a_worker_child_mid_batch_loses_and_repeats_nothing(
    drip: Callable[..., Result], pipeline: Pipeline
) -> None:
    pipeline.smtp.delay = 0.02  # slow enough to catch a batch in the middle
    enrol_csv(drip, pipeline, many(200))
    worker = pipeline.worker(concurrency=2)
    pipeline.beat()
    pipeline.wait_for_messages(30)
    children = psutil.Process(worker.pid).children()
    assert children, pipeline.logs()
    assert len(pipeline.smtp.messages) < 200  # mid-run
    children[0].send_signal(signal.SIGKILL)
    time.sleep(1)
    assert not children[0].is_running() or children[0].status() == psutil.STATUS_ZOMBIE
    pipeline.set_now(pipeline.now() + timedelta(seconds=LEASE_SECONDS + 1))  # leases run out
    pipeline.wait_settled()
    messages = pipeline.check_books_balance()
    states = pipeline.states()
    assert states["sent"] + states["unknown"] == 200 and states["unknown"] <= 1
    assert len(messages) >= states["sent"]


def test_flushall_mid_run_loses_nothing(
    drip: Callable[..., Result], pipeline: Pipeline, redis_url: str
) -> None:
    pipeline.smtp.delay = 0.01
    enrol_csv(drip, pipeline, many(200))
    pipeline.worker()
    pipeline.beat()
    pipeline.wait_for_messages(20)
    assert pipeline.ids_in("claimed")  # ids are waiting in Redis…
    redis_client(redis_url).flushall()  # …and now they are gone
    pipeline.set_now(pipeline.now() + timedelta(seconds=LEASE_SECONDS + 1))
    pipeline.wait_settled()
    pipeline.check_books_balance()
    assert pipeline.states()["sent"] == 200


def test_killing_and_restarting_the_ticker_loses_and_repeats_nothing(
    drip: Callable[..., Result], pipeline: Pipeline
) -> None:
    pipeline.smtp.delay = 0.01
    enrol_csv(drip, pipeline, many(150))
    pipeline.worker()
    ticker = pipeline.beat()
    pipeline.wait_for_messages(10)
    ticker.send_signal(signal.SIGKILL)
    ticker.wait()
    assert len(pipeline.smtp.messages) < 150  # mid-run
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
