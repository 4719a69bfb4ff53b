"""Running drip: the private Redis, what goes through Redis, `worker.py`, `drip run`, the demo."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import Celery
from click.testing import Result

from drip.broker import EmbeddedRedis, redis_client
from drip.clock import Clock
from drip.settings import Settings
from drip.tasks import SEND_QUEUE, configure
from drip.ticker import Ticker
from tests.conftest import TEST_SECRET
from tests.polling import wait_until

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")} | extra


def test_the_private_redis_starts_is_reused_and_stops(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    url = first.start()
    assert url.startswith("redis+socket://") and first.alive()
    assert oct(first.socket.stat().st_mode)[-3:] == "700"  # this user only
    second = EmbeddedRedis(tmp_path)
    assert second.start() == url and second.process is None  # found running: reused
    second.stop()
    assert first.alive()  # a command that did not start it leaves it alone
    first.stop()
    assert not first.alive() and not first.socket.exists()


def test_a_very_deep_var_folder_still_gets_a_short_socket_path(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["folder-with-a-long-name"] * 6)
    server = EmbeddedRedis(deep)
    assert len(str(server.socket)) <= 100
    server.start()
    try:
        assert server.alive()
    finally:
        server.stop()


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)  # about Redis, not the database
def test_redis_carries_delivery_ids_only(
    drip: Callable[..., Result], settings: Settings, tmp_path: Path, engine: object
) -> None:
    result = drip(
        "enroll",
        "zoe@example.com",
        "--campaign",
        "ketamine-onboarding",
        "--first-name",
        "Zoë",
        "--last-name",
        "Smith",
    )
    assert result.exit_code == 0, result.output
    redis_server = EmbeddedRedis(tmp_path)
    url = redis_server.start()
    try:
        app = configure(settings, url)
        from drip import tasks

        ticker = Ticker(engine, settings, Clock(settings.now), tasks._enqueue)  # type: ignore[arg-type]
        assert ticker.tick().claimed == 1
        client = redis_client(url)
        queued = client.lrange(SEND_QUEUE, 0, -1)
        assert len(queued) == 1
        everything = b"".join(client.dump(k) or b"" for k in client.keys("*"))
        for secret in (b"zoe@example.com", "Zoë".encode(), b"Smith", b"Zo\\u00eb"):
            assert secret not in everything and secret not in queued[0]
        message = json.loads(queued[0])
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert args == [[1]] and kwargs == {}  # one list of delivery ids, nothing else
        app.control.purge()
    finally:
        redis_server.stop()


def test_worker_py_exposes_the_app_for_celery(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    url = server.start()
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import worker; print(sorted(worker.app.tasks))"],
            cwd=ROOT,
            env=clean_env(DRIP_BROKER_URL=url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "'drip.send_batch'" in out.stdout and "'drip.tick'" in out.stdout
        ping = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker", "report"],
            cwd=ROOT,
            env=clean_env(DRIP_BROKER_URL=url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ping.returncode == 0, ping.stderr
        assert "redis+socket" in ping.stdout or "broker" in ping.stdout
    finally:
        server.stop()


def test_drip_run_starts_everything_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = clean_env(
        DRIP_DATABASE_URL=f"sqlite:///{tmp_path}/drip.db",
        DRIP_MAIL_URL=f"file://{tmp_path}/outbox",
        DRIP_SECRET_KEY=TEST_SECRET,
    )
    assert (
        subprocess.run(
            [sys.executable, "-m", "drip", "db", "upgrade"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=60,
        ).returncode
        == 0
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "drip", "run", "--concurrency", "1"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    socket = tmp_path / "var" / "redis" / "redis.sock"
    try:
        url = wait_until(lambda: _answers_ping(socket), "the private Redis to answer PING")
        ping = Celery(broker=url).control.ping
        wait_until(lambda: ping(timeout=1.0), "the worker to answer a ping", describe=log.read_text)
        wait_until(lambda: _ticked(log), "beat's first tick to run", describe=log.read_text)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text()
    assert process.returncode == 0, output
    assert "ready" in output  # the worker said it came up
    assert not socket.exists()  # and the private Redis was stopped last
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def _children(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc (no psutil: what the kernel says)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent (or an init) to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_drip_run_takes_worker_beat_and_redis_with_it(tmp_path: Path) -> None:
    env = clean_env(
        DRIP_DATABASE_URL=f"sqlite:///{tmp_path}/drip.db",
        DRIP_MAIL_URL=f"file://{tmp_path}/outbox",
        DRIP_SECRET_KEY=TEST_SECRET,
    )
    upgrade = [sys.executable, "-m", "drip", "db", "upgrade"]
    assert subprocess.run(upgrade, cwd=tmp_path, env=env, timeout=60).returncode == 0
    log = (tmp_path / "run.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "drip", "run", "--concurrency", "1"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while True:  # redis, worker (and its pool process) and beat, all started
            assert process.poll() is None, (tmp_path / "run.log").read_text()
            children = _children(process.pid)
            commands = " | ".join(_command(pid) for pid in children)
            ready = b"ready" in (tmp_path / "run.log").read_bytes()
            if ready and all(name in commands for name in ("redis-server", "worker", "beat")):
                family = set(children) | {g for c in children for g in _children(c)}
                break
            assert time.monotonic() < deadline, f"drip run did not come up: {commands}"
            time.sleep(0.1)
        assert len(family) >= 4  # the pool process of the worker too
        process.kill()
        process.wait(10)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in family):
            left = [_command(pid) for pid in family if _alive(pid)]
            assert time.monotonic() < deadline, f"still running after kill -9: {left}"
            time.sleep(0.1)
    finally:
        log.close()
        for pid in family | {process.pid}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _answers_ping(socket: Path) -> str | None:
    """The broker URL of the private Redis at `socket`, once it answers PING."""
    url = f"redis+socket://{socket}"
    try:
        return url if socket.exists() and redis_client(url).ping() else None
    except redis.ConnectionError:
        return None


def _ticked(log: Path) -> bool:
    """The worker has run a tick that beat sent (Celery logs each task it finishes)."""
    lines = log.read_text().splitlines()
    return any("drip.tick[" in line and "succeeded" in line for line in lines)


def test_the_demo_plays_the_campaign_and_leaves_the_emails(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "drip", "demo", "--patients", "2"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    emails = sorted((tmp_path / "var" / "demo" / "outbox").glob("*.eml"))
    pages = sorted((tmp_path / "var" / "demo" / "outbox").glob("*.html"))
    assert len(emails) == len(pages) == 16
    assert "<html" in pages[0].read_text()
    assert "16 emails delivered" in out.stdout
