"""`drip run`: the embedded Redis (if no broker is configured), a worker and the ticker, for one
machine, supervised: a child that dies is restarted, after a pause that doubles while it keeps
dying soon after its start; one that dies quickly QUICK_FAILURES times in a row stops everything,
with the reason (a crash loop fills the log and helps nobody). Ctrl-C or SIGTERM stops
everything cleanly (children first, with Celery's warm shutdown, then Redis); so does the death
of `drip run` itself, even by `kill -9` (drip.processes)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType

from drip.broker import broker
from drip.clock import write_clock_file
from drip.errors import DripError
from drip.permissions import private_folder
from drip.processes import die_with_parent
from drip.settings import Settings

log = logging.getLogger("drip.run")
STOP_TIMEOUT = 30.0
RUN_CLOCK = "run-clock"  # under var/: the run's calendar, when DRIP_NOW is set


def child_environment(settings: Settings, broker_url: str) -> dict[str, str]:
    """This environment with the broker's URL. Under DRIP_NOW the run's calendar goes on as a
    clock file (DRIP_NOW_FILE): each child reading DRIP_NOW itself would start its calendar when
    it starts (a restarted worker, seconds or hours later, too), and leases would not agree."""
    env = dict(os.environ) | {"DRIP_BROKER_URL": broker_url}
    if settings.now is not None and settings.now_file is None:
        path = (settings.var_dir / RUN_CLOCK).resolve()
        private_folder(path.parent)
        write_clock_file(path, settings.clock().now())
        env |= {"DRIP_NOW": "", "DRIP_NOW_FILE": str(path)}
    return env


@dataclass(frozen=True)
class Backoff:
    """When to restart a child, and when to give up on it."""

    first: float = 1.0  # pause before the first restart after a quick exit; doubles each time
    longest: float = 60.0
    quick: float = 30.0  # an exit this soon after the start counts toward giving up
    quick_failures: int = 5  # this many quick exits in a row stop `drip run`

    def pause(self, failures: int) -> float:
        """The pause after `failures` quick exits in a row (0: the child ran a while)."""
        return min(self.first * 2.0 ** max(failures - 1, 0), self.longest)


def drip_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "drip", *args]


@dataclass
class Child:
    """One supervised command (a `drip` sub-command in `drip run`)."""

    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0
    failures: int = 0  # quick exits in a row
    restart_at: float | None = None

    @property
    def name(self) -> str:
        return " ".join(self.command[2:4]) if self.command[1:2] == ["-m"] else self.command[0]

    def start(self, env: Mapping[str, str]) -> None:
        self.process = subprocess.Popen(self.command, env=env, preexec_fn=die_with_parent())
        self.started = time.monotonic()
        self.restart_at = None


@dataclass
class Supervisor:
    settings: Settings
    children: list[Child] = field(default_factory=list)
    stopping: bool = False
    backoff: Backoff = field(default_factory=Backoff)

    def run(self, worker_args: list[str]) -> int:
        with broker(self.settings.broker_url, self.settings.var_dir) as url:
            env = child_environment(self.settings, url)
            children = [Child(drip_command("worker", *worker_args)), Child(drip_command("beat"))]
            return self.supervise(children, env)

    def supervise(self, children: list[Child], env: Mapping[str, str]) -> int:
        """Start `children` and keep them running until a signal (0), or raise a DripError
        when one keeps dying (everything is stopped first)."""
        self.children = children
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for child in self.children:
                child.start(env)
            self._watch(env)
        finally:
            self._terminate()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def _watch(self, env: Mapping[str, str]) -> None:
        while not self.stopping:
            time.sleep(0.05)
            now = time.monotonic()
            for child in self.children:
                assert child.process is not None
                if self.stopping:
                    return
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        child.start(env)
                elif child.process.poll() is not None:
                    self._exited(child, now)

    def _exited(self, child: Child, now: float) -> None:
        """Schedule the restart of a child that exited, or give up on it."""
        assert child.process is not None
        code = child.process.returncode
        child.failures = child.failures + 1 if now - child.started < self.backoff.quick else 0
        if child.failures >= self.backoff.quick_failures:
            reason = (
                f"{child.name} exited with code {code} {child.failures} times in a row, each "
                f"within {self.backoff.quick:g} s of its start; stopping everything (see its "
                "log above for why)"
            )
            log.error("%s", reason)
            raise DripError(reason)
        pause = self.backoff.pause(child.failures)
        child.restarts += 1
        child.restart_at = now + pause
        log.warning(
            "%s exited with code %s; restarting in %g s (restart %d)",
            child.name,
            code,
            pause,
            child.restarts,
        )

    def _terminate(self) -> None:
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in running:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
