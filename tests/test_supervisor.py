"""The supervisor of `drip run`, with real short-lived child processes in place of worker and
beat: it backs off while a child keeps dying, and gives up (stopping the others) after
Backoff.quick_failures quick exits in a row."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from drip.errors import DripError
from drip.settings import Settings
from drip.supervisor import Backoff, Child, Supervisor

FAST = Backoff(first=0.01, longest=0.04, quick=30.0, quick_failures=5)


def crashing(starts: Path) -> Child:
    """A child that notes its start in `starts`, then exits 3 at once."""
    code = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)"
    return Child([sys.executable, "-c", code])


def test_the_pause_doubles_up_to_a_ceiling() -> None:
    backoff = Backoff(first=1.0, longest=30.0)
    assert [backoff.pause(n) for n in range(8)] == [1, 1, 2, 4, 8, 16, 30, 30]


def test_a_child_that_keeps_dying_at_once_stops_everything_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    starts = tmp_path / "starts"
    sleeper = Child([sys.executable, "-c", "import time; time.sleep(600)"])
    supervisor = Supervisor(Settings(), backoff=FAST)
    with pytest.raises(DripError) as caught:
        supervisor.supervise([crashing(starts), sleeper], dict(os.environ))
    message = str(caught.value)
    assert "exited with code 3 5 times in a row" in message and "see its log" in message
    assert starts.read_text() == "x" * 5  # started once, restarted 4 times, then no more
    assert sleeper.process is not None and sleeper.process.poll() is not None  # stopped too
    assert message in caplog.text


def test_a_child_that_ran_a_while_before_each_exit_is_restarted_every_time(
    tmp_path: Path,
) -> None:
    starts = tmp_path / "starts"
    supervisor = Supervisor(Settings(), backoff=Backoff(first=0.01, quick=0.0))

    def stop_after_ten_starts() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if starts.exists() and len(starts.read_text()) >= 10:
                break
            time.sleep(0.01)
        supervisor.stopping = True

    watcher = threading.Thread(target=stop_after_ten_starts)
    watcher.start()
    assert supervisor.supervise([crashing(starts)], dict(os.environ)) == 0
    watcher.join()
    assert len(starts.read_text()) >= 10
