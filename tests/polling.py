"""Waiting for a condition, for tests: never a fixed sleep, never a bound on how fast it comes.

The deadline only stops a test that would otherwise wait forever; it is generous because a loaded
CI machine can be many times slower than a laptop, and a test that passes must not depend on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

TIMEOUT = 120.0


def wait_until(
    condition: Callable[[], T],
    what: str,
    timeout: float = TIMEOUT,
    describe: Callable[[], str] = lambda: "",
) -> T:
    """Call `condition` until it returns something true, and return that; AssertionError naming
    `what` (and `describe()`, e.g. the logs) if it has not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}\n{describe()}")
        time.sleep(0.05)
    return result
