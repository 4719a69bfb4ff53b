"""A real `drip serve` for tests: a subprocess on a free loopback port, its output in files, ready
once /healthz answers (whatever it answers: a server whose database is down is ready too), and
an HTTP client that can send what browsers would not (a GET with a body)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.polling import wait_until

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
    return port


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@dataclass
class Served:
    """One running `drip serve`."""

    process: subprocess.Popen[bytes]
    port: int
    root: Path

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=dict(headers or {}))
            response = connection.getresponse()
            return Answer(response.status, response.headers, response.read())
        finally:
            connection.close()

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def post_form(self, path: str, body: str) -> Answer:
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        return self.request("POST", path, body, form)

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"drip serve exited with {self.process.returncode}\n{self.logs()}")
        try:
            self.get("/healthz")
        except OSError:
            return False
        return True

    def logs(self) -> str:
        return "".join(
            (self.root / name).read_text(encoding="utf-8", errors="replace")
            for name in ("serve.out", "serve.err")
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop it with `sig`; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"drip serve did not stop on {sig}\n{self.logs()}") from None


def server_environment(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its DRIP_* variables, plus `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
    return clean | dict(env)


def start(env: Mapping[str, str], root: Path, *args: str) -> subprocess.Popen[bytes]:
    """`drip serve ARGS` in `root`, stdout and stderr in root/serve.out and root/serve.err."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "serve.out").open("wb") as out, (root / "serve.err").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "drip", "serve", *args],
            env=server_environment(env),
            cwd=root,
            stdout=out,
            stderr=err,
        )


@contextmanager
def serving(env: Mapping[str, str], root: Path, workers: int = 2) -> Iterator[Served]:
    """A ready `drip serve` with `workers` workers; stopped (SIGTERM) afterwards."""
    port = free_port()
    process = start(env, root, "--host", HOST, "--port", str(port), "--workers", str(workers))
    served = Served(process, port, root)
    try:
        wait_until(served.answers, "drip serve to answer /healthz", describe=served.logs)
        yield served
    finally:
        served.stop()
