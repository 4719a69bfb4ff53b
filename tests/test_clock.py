"""One clock: under DRIP_NOW every process of one run reads the same calendar; without it, a host
whose clock is off from the database's is refused.

Clocks are compared by their offsets from real time (clock.now() - utcnow()), never by absolute
readings, so a slow or busy machine cannot make the comparisons fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from drip import db
from drip.clock import Clock, utcnow
from drip.errors import ConfigError
from drip.models import Delivery
from drip.settings import Settings

START = datetime(2026, 10, 30, 14, 0, tzinfo=UTC)  # Fri 10:00 in New York
KEY = "clock-test-secret-key-of-at-least-32-bytes"
LATER = 0.5  # seconds of real time between reading the settings and making a clock
CAMPAIGN = ("--campaign", "ketamine-onboarding")
AGREE = timedelta(seconds=0.1)  # far above the microseconds two readings are apart


def offset(clock: Clock) -> timedelta:
    """How far `clock` reads from real time: the largest of a few readings, since a pause
    between the two reads can only make one reading smaller."""
    return max(clock.now() - utcnow() for _ in range(5))


def test_a_clock_reads_its_start_at_its_anchor_whenever_it_is_made() -> None:
    anchor = utcnow() - timedelta(hours=1)
    clock = Clock(START, anchor=anchor)
    assert abs(offset(clock) - (START - anchor)) < AGREE


def test_every_clock_of_one_settings_reads_one_calendar_even_after_a_fork() -> None:
    """A worker's pool processes make their Clock after the fork, on their first task."""
    settings = Settings.from_env({"DRIP_NOW": START.isoformat(), "DRIP_SECRET_KEY": KEY})
    parent = offset(settings.clock())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: like a pool process, it makes its Clock well after the fork
        try:
            time.sleep(LATER)  # not a wait for readiness: the real time passing is the point
            os.write(write, str(offset(settings.clock()) / timedelta(microseconds=1)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = timedelta(microseconds=float(pipe.read()))
    assert os.waitpid(pid, 0)[1] == 0
    assert abs(child - parent) < AGREE


@pytest.fixture
def run_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
    env = clean | {
        "DRIP_DATABASE_URL": f"sqlite:///{tmp_path / 'drip.db'}",
        "DRIP_SECRET_KEY": KEY,
        "DRIP_MAIL_URL": f"file://{tmp_path / 'outbox'}",
        "DRIP_NOW": START.isoformat(),
        "DRIP_SEND_WINDOW": "00:00-24:00",
        "DRIP_TICK_SECONDS": "0.2",
    }
    drip(env, tmp_path, "db", "upgrade")
    yield env


def drip(env: dict[str, str], cwd: Path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "drip", *args], env=env, cwd=cwd, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()


def wait_for(condition: Callable[[], bool], what: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, (
            f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}"
        )
        time.sleep(0.1)


@pytest.mark.slow
def test_under_drip_run_the_sender_reads_the_calendar_that_began_when_drip_run_started(
    run_env: dict[str, str], tmp_path: Path
) -> None:
    """The run's calendar is START when `drip run` reads DRIP_NOW, and runs on from there in every
    child: an email sent after the run is ready plus LATER s carries a time at least that far past
    START. (Each process fixing its own offset when it made its clock wrote START + a few ms.)"""
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "drip", "run", "--concurrency=2"],
            env=run_env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    engine = db.make_engine(run_env["DRIP_DATABASE_URL"])
    try:
        wait_for(lambda: " ready." in log.read_text(), "worker ready", log)
        ready = utcnow()  # `drip run` read its settings before this
        time.sleep(LATER)  # not a wait for readiness: the run's calendar moving on is the point
        enrolled = utcnow()  # the email is sent after this
        drip(run_env, tmp_path, "enroll", "ana@example.com", *CAMPAIGN, "--first-name", "Ana")

        def sent_at() -> datetime | None:
            with engine.connect() as c:
                return c.scalar(select(Delivery.sent_at).where(Delivery.state == "sent"))

        wait_for(lambda: sent_at() is not None, "email sent", log)
        sent = sent_at()
        assert sent is not None and sent - START >= enrolled - ready
    finally:
        engine.dispose()
        run.send_signal(signal.SIGTERM)
        run.wait(60)


def test_the_offset_from_the_databases_clock_is_measured_and_within_the_bound(
    engine: Engine, db_kind: str
) -> None:
    measured = db.clock_offset(engine)
    if db_kind == "sqlite":
        assert measured == timedelta(0)  # a local file: the database's clock is this host's
    else:
        assert abs(measured) < db.MAX_CLOCK_SKEW
    db.require_clock_in_step(engine)


def test_a_host_whose_clock_is_off_from_the_databases_is_refused_with_the_fix(
    engine: Engine, db_kind: str
) -> None:
    def ahead() -> datetime:
        return utcnow() + timedelta(seconds=30)

    if db_kind == "sqlite":
        db.require_clock_in_step(engine, local=ahead)  # one host's clock, whatever it reads
        return
    with pytest.raises(ConfigError) as refused:
        db.require_clock_in_step(engine, local=ahead)
    message = str(refused.value)
    assert socket.gethostname() in message and "30" in message and "ahead" in message
    assert f"{db.MAX_CLOCK_SKEW.total_seconds():g} s" in message
    assert "sync this host's clock (chrony/ntpd)" in message


def test_under_drip_now_or_drip_now_file_the_clock_check_is_skipped(tmp_path: Path) -> None:
    """The calendar is then deliberately not the database's."""
    (tmp_path / "now").write_text(START.isoformat())
    for shifted in ({"DRIP_NOW": START.isoformat()}, {"DRIP_NOW_FILE": str(tmp_path / "now")}):
        assert not Settings.from_env({"DRIP_SECRET_KEY": KEY} | shifted).uses_real_clock
    assert Settings.from_env({"DRIP_SECRET_KEY": KEY}).uses_real_clock
