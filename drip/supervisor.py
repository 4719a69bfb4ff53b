"""`drip run`: the embedded Redis (if no broker is configured), a worker and the ticker, for one
machine, supervised: a child that dies is restarted; Ctrl-C or SIGTERM stops everything cleanly
(children first, with Celery's warm shutdown, then Redis)."""

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
from drip.settings import Settings

log = logging.getLogger("drip.run")
RESTART_DELAY = 2.0
STOP_TIMEOUT = 30.0
RUN_CLOCK = "run-clock"  # under var/: the run's calendar, when DRIP_NOW is set


def child_environment(settings: Settings, broker_url: str) -> dict[str, str]:
    """This environment with the broker's URL. Under DRIP_NOW the run's calendar goes on as a
    clock file (DRIP_NOW_FILE): each child reading DRIP_NOW itself would start its calendar when
    it starts (a restarted worker, seconds or hours later, too), and leases would not agree."""
    env = dict(os.environ) | {"DRIP_BROKER_URL": broker_url}
    if settings.now is not None and settings.now_file is None:
        path = (settings.var_dir / RUN_CLOCK).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_clock_file(path, settings.clock().now())
        env |= {"DRIP_NOW": "", "DRIP_NOW_FILE": str(path)}
    return env


@dataclass
class Child:
    """One supervised `drip` sub-command."""

    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self, env: Mapping[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "drip", *self.args], env=env)


@dataclass
class Supervisor:
    settings: Settings
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    def run(self, worker_args: list[str]) -> int:
        with broker(self.settings.broker_url, self.settings.var_dir) as url:
            env = child_environment(self.settings, url)
            self.children = [Child(["worker", *worker_args]), Child(["beat"])]
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
            time.sleep(0.2)
            for child in self.children:
                assert child.process is not None
                if child.process.poll() is not None and not self.stopping:
                    child.restarts += 1
                    log.warning(
                        "drip %s exited with %s; restarting (restart %d)",
                        child.args[0],
                        child.process.returncode,
                        child.restarts,
                    )
                    time.sleep(RESTART_DELAY)
                    child.start(env)

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
