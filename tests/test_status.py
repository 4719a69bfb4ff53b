"""`drip status`: the database's figures (the truth) and Redis's (work in hand), whether or not
Redis is there; a database that cannot be read is exit 1 with the fix."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import Engine, event, text, update
from sqlalchemy.orm import Session

from drip import status as status_module
from drip import tasks
from drip.broker import redis_client
from drip.models import Delivery, Enrolment
from drip.settings import Settings
from drip.ticker import Heartbeat, Ticker, parse_heartbeat, record_heartbeat
from tests.conftest import NOW
from tests.polling import wait_until
from tests.smtp_servers import closed_port
from tests.test_pipeline import (  # noqa: F401 - fixtures
    Pipeline,
    enrol_csv,
    many,
    pipeline,
    redis_url,  # noqa: F401 - the session's private redis-server
)

Drip = Callable[..., Result]
CONTRACT_KEYS = {"deliveries", "due_now", "oldest_due_seconds", "workers", "queue_depth"}


def rows(engine: Engine, **by_id: dict[str, object]) -> None:
    with engine.begin() as c:
        for key, values in by_id.items():
            c.execute(update(Delivery).where(Delivery.id == int(key[1:])).values(**values))


def setup(drip: Drip, engine: Engine) -> None:
    """Two patients' 16 rows, all far in the future; then a few chosen ones."""
    for email in ("ana@example.com", "ben@example.com"):
        result = drip("enroll", email, "--campaign", "ketamine-onboarding", "--first-name", "A")
        assert result.exit_code == 0, result.output
    with engine.begin() as c:
        c.execute(update(Delivery).values(state="scheduled", due_at=NOW + timedelta(days=9)))
        c.execute(update(Enrolment).where(Enrolment.id == 2).values(status="paused"))
    ago = lambda minutes: NOW - timedelta(minutes=minutes)  # noqa: E731
    rows(
        engine,
        d1={"due_at": ago(10)},  # due: the oldest, 600 s late
        d2={"state": "retry", "due_at": ago(5)},  # due, to be retried
        d3={"due_at": NOW + timedelta(hours=1)},  # not yet due
        d4={"state": "sent", "sent_at": ago(30)},  # sent in the last hour
        d5={"state": "sent", "sent_at": ago(120)},  # sent before it
        d6={"state": "failed", "updated_at": ago(10)},  # failed in the last hour
        d7={"state": "failed", "updated_at": ago(180)},
        d8={"state": "unknown"},
        d9={"due_at": ago(60)},  # due, but its enrolment is paused: held, not late
    )


def test_status_json_counts_from_the_database_with_redis_down(drip: Drip, engine: Engine) -> None:
    setup(drip, engine)
    down = {"DRIP_BROKER_URL": f"redis://127.0.0.1:{closed_port()}/0"}
    result = drip("status", "--json", env=down)
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert CONTRACT_KEYS <= set(found)
    assert found["deliveries"] == {
        "scheduled": 10, "claimed": 0, "sending": 0, "sent": 2, "retry": 1, "failed": 2,
        "unknown": 1, "skipped": 0, "cancelled": 0,
    }  # fmt: skip
    assert found["due_now"] == 2 and found["oldest_due_seconds"] == 600
    assert found["sent_last_hour"] == 1 and found["failed_last_hour"] == 1
    # what Redis would say is unknown, not zero
    assert found["workers"] is found["queue_depth"] is found["ticker_late"] is None
    assert found["redis"]["reachable"] is False and "unreachable" in found["redis"]["error"]


def test_with_redis_down_status_prints_the_database_figures_and_the_fix(
    drip: Drip, engine: Engine
) -> None:
    setup(drip, engine)
    port = closed_port()
    url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
    result = drip("status", env={"DRIP_BROKER_URL": url})
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())  # as one line, however it was wrapped
    assert "scheduled 10" in out and "2, the oldest 10 min overdue" in out
    assert "1 sent · 1 failed" in out
    assert f"Redis unreachable at redis://:***@127.0.0.1:{port}/0" in out
    assert "start Redis there, or set DRIP_BROKER_URL" in out
    assert "s3cret-pw" not in result.output


def test_with_no_broker_configured_status_says_the_private_redis_is_not_running(
    drip: Drip, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup(drip, engine)
    monkeypatch.chdir(tmp_path)
    result = drip("status")
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "Redis not running at redis+socket://" in out and "drip run" in out
    assert not (tmp_path / "var" / "redis").exists()  # nothing was started to find out


def test_status_reads_queues_workers_and_the_ticker_from_redis(
    drip: Drip, engine: Engine, redis_url: str  # noqa: F811
) -> None:
    setup(drip, engine)
    client = redis_client(redis_url)
    client.flushall()
    env = {"DRIP_BROKER_URL": redis_url}
    quiet = json.loads(drip("status", "--json", env=env).stdout)
    assert quiet["workers"] == [] and quiet["queue_depth"] == 0
    assert quiet["ticker_last_run"] is None and quiet["ticker_late"] is True
    client.rpush(tasks.SEND_QUEUE, "a batch", "another")
    record_heartbeat(client, tick_seconds=5)
    busy = json.loads(drip("status", "--json", env=env).stdout)
    assert busy["queue_depth"] == 2 and busy["queues"] == {"drip": 2, "drip.tick": 0}
    assert busy["ticker_last_run"] and busy["ticker_late"] is False
    record_heartbeat(client, tick_seconds=5, at=NOW.replace(year=2025))
    late = drip("status", env=env)
    assert late.exit_code == 0 and "late; is `drip beat` running" in " ".join(late.stdout.split())
    client.flushall()


def test_status_with_the_database_down_is_exit_1_with_the_fix(drip: Drip) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/drip"
    result = drip("status", env={"DRIP_DATABASE_URL": url})
    assert result.exit_code == 1
    assert "cannot open the database at postgresql+psycopg://postgres@127.0.0.1" in result.stderr
    assert "start the database server, or correct DRIP_DATABASE_URL" in result.stderr


def test_status_of_a_database_never_migrated_says_to_run_db_upgrade(
    drip: Drip, tmp_path: Path
) -> None:
    result = drip("status", env={"DRIP_DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}"})
    assert result.exit_code == 1 and "drip db upgrade" in result.stderr


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a Redis that hangs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


def test_a_redis_that_never_answers_does_not_hold_status_up(
    env: dict[str, str], engine: Engine, silent_server: int, tmp_path: Path
) -> None:
    """Socket timeouts: the command ends on its own (the subprocess timeout only stops a hang)."""
    command = [sys.executable, "-m", "drip", "status"]
    environ = env | {"DRIP_BROKER_URL": f"redis://127.0.0.1:{silent_server}/0"}
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())
    assert f"Redis unreachable at redis://127.0.0.1:{silent_server}/0" in said


def test_status_names_the_queues_drip_tasks_uses() -> None:
    assert status_module.SEND_QUEUE == tasks.SEND_QUEUE
    assert status_module.TICK_QUEUE == tasks.TICK_QUEUE


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_every_status_query_can_be_answered_from_an_index(engine: Engine) -> None:
    """The plans at a million rows are in docs/performance.md; here, with sequential scans
    priced out, PostgreSQL must find an index for every query status runs on deliveries."""
    ran: list[tuple[str, Any]] = []

    def capture(_c: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        ran.append((statement, parameters))

    with engine.connect() as c:
        c.execute(text("SET enable_seqscan = off"))
        event.listen(engine, "before_cursor_execute", capture)
        try:
            with Session(bind=c) as session:
                status_module.deliveries(session, now=NOW)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        assert len(ran) == 4
        for statement, parameters in ran:
            plan = "\n".join(r[0] for r in c.exec_driver_sql(f"EXPLAIN {statement}", parameters))
            assert "Seq Scan on deliveries" not in plan, plan


# --- with real processes --------------------------------------------------------------------


@pytest.mark.slow
def test_status_json_agrees_with_a_real_worker_and_ticker(
    drip: Drip, pipeline: Pipeline  # noqa: F811
) -> None:
    enrol_csv(drip, pipeline, many(30))
    pipeline.worker("w1")
    pipeline.beat()
    pipeline.wait_settled()
    command = [sys.executable, "-m", "drip", "status", "--json"]
    done = subprocess.run(
        command, env=pipeline.env, cwd=pipeline.root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    states = pipeline.states()
    assert found["deliveries"] == {state: states[state] for state in found["deliveries"]}
    assert found["deliveries"]["sent"] == found["sent_last_hour"] == 30
    assert found["due_now"] == 0 and found["oldest_due_seconds"] is None
    assert found["failed_last_hour"] == 0
    assert found["workers"] == [f"w1@{socket.gethostname()}"]
    assert found["queue_depth"] == 0
    assert found["ticker_last_run"] and found["ticker_late"] is False


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_watch_with_json_writes_one_object_a_line_until_ctrl_c_then_exit_0(
    drip: Drip, engine: Engine, env: dict[str, str]
) -> None:
    setup(drip, engine)
    environ = env | {"DRIP_BROKER_URL": f"redis://127.0.0.1:{closed_port()}/0"}
    command = [sys.executable, "-m", "drip", "status", "--watch", "0.2", "--json"]
    with subprocess.Popen(command, env=environ, stdout=subprocess.PIPE, text=True) as watch:
        assert watch.stdout is not None
        first, second = json.loads(watch.stdout.readline()), json.loads(watch.stdout.readline())
        watch.send_signal(signal.SIGINT)
        assert watch.wait(60) == 0
    assert first["deliveries"] == second["deliveries"] and CONTRACT_KEYS <= set(second)


def _tmux(server: Path, *args: str) -> str:
    done = subprocess.run(
        ["tmux", "-S", str(server), *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """A tmux server of this test's own (its own socket), killed afterwards."""
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is required under CI (apt-get install tmux)")
        pytest.skip("tmux is not installed")
    server = tmp_path / "tmux.sock"
    yield lambda *args: _tmux(server, *args)
    subprocess.run(["tmux", "-S", str(server), "kill-server"], capture_output=True, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_watch_refreshes_in_place_in_a_real_terminal_and_ctrl_c_ends_it_with_exit_0(
    drip: Drip, engine: Engine, env: dict[str, str], tmux: Callable[..., str], tmp_path: Path
) -> None:
    setup(drip, engine)
    environ = env | {"DRIP_BROKER_URL": f"redis://127.0.0.1:{closed_port()}/0", "TERM": "xterm"}
    exit_file = tmp_path / "exit-status"
    watch = " ".join(
        ["env", *(shlex.quote(f"{k}={v}") for k, v in environ.items()),
         shlex.quote(sys.executable), "-m", "drip", "status", "--watch", "0.3"]
    )  # fmt: skip
    # bash waits for the watch and writes its exit status (tmux's own #{pane_dead_status} is
    # sometimes never filled in on this kind of machine)
    command = f"bash -c {shlex.quote(f'{watch}; echo $? > {exit_file}; sleep 600')}"
    tmux("new-session", "-d", "-s", "watch", "-x", "150", "-y", "45", command)
    screen = lambda: tmux("capture-pane", "-p", "-t", "watch")  # noqa: E731
    wait_until(lambda: "scheduled 10" in screen(), "the first status", describe=screen)
    rows(engine, d3={"state": "failed", "updated_at": NOW})
    wait_until(lambda: "failed 3" in screen(), "a refresh showing the change", describe=screen)
    shown = screen()
    assert shown.count("deliveries") == 1, shown  # redrawn in place, not scrolled
    assert "Redis unreachable at" in shown and "every 0.3 s; Ctrl-C to stop" in shown
    tmux("send-keys", "-t", "watch", "C-c")
    ended = lambda: exit_file.exists() and exit_file.read_text().strip()  # noqa: E731
    assert wait_until(ended, "the watch to end on Ctrl-C", describe=screen) == "0", screen()
    assert "Traceback" not in screen() and "interrupted" not in screen()


# --- the ticker's heartbeat -------------------------------------------------------------------


def test_each_tick_that_runs_leaves_a_heartbeat(settings: Settings, engine: Engine) -> None:
    beats: list[int] = []
    ticker = Ticker(engine, settings, settings.clock(), lambda ids: None,
                    heartbeat=lambda: beats.append(1))  # fmt: skip
    ticker.tick()
    ticker.tick()
    assert beats == [1, 1]


def test_a_heartbeat_is_late_after_three_ticks_and_never_before_a_minute() -> None:
    fast = Heartbeat(NOW, "host", tick_seconds=0.2)
    assert not fast.late(NOW + timedelta(seconds=59)) and fast.late(NOW + timedelta(seconds=61))
    slow = Heartbeat(NOW, "host", tick_seconds=600)
    assert not slow.late(NOW + timedelta(minutes=29)) and slow.late(NOW + timedelta(minutes=31))
    assert fast.age(NOW - timedelta(seconds=5)) == timedelta(0)  # a clock a little behind


@pytest.mark.parametrize("raw", [None, b"", b"not json", b'{"at": "yesterday"}', b"[]"])
def test_a_missing_or_garbled_heartbeat_reads_as_none(raw: bytes | None) -> None:
    assert parse_heartbeat(raw) is None


def test_ago_says_durations_as_people_do() -> None:
    said = [status_module.ago(timedelta(seconds=s)) for s in (4, 134, 3600, 11100, 3 * 86400)]
    assert said == ["4 s", "2 min 14 s", "1 h", "3 h 5 min", "3 d"]
