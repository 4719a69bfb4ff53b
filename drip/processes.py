"""Children that die with the process that started them.

`kill -9` of `drip run` gives it no chance to stop its worker, beat and private Redis, and they
would run on, orphaned (a worker still sending, a Redis still holding the socket). On Linux a
child asks the kernel, between fork and exec, for SIGTERM when its parent goes
(prctl(PR_SET_PDEATHSIG)): Celery and Redis take SIGTERM as "shut down cleanly". Elsewhere
there is no such call, and this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen (None where the platform has no PR_SET_PDEATHSIG).

    The kernel signals when the *thread* that forked the child ends, so start children from a
    thread that lives as long as the process (drip does it from the main thread)."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not after

    def in_child() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child
