"""What a worker counts as it sends and ticks: the interface the sending and ticking code calls,
its no-op default, and an in-memory one for tests.

The Sender and the Ticker take a Recorder as an argument, as they take their transport and clock,
so no domain module imports Prometheus: drip.metrics implements this interface over
prometheus-client for `drip worker --metrics-port`; everywhere else (tests, `drip demo`, one-off
commands) the default records nothing.

A failure's reason is one of FAILURE_REASONS, never a server's reply or an exception's text: a
label value must not carry personal data, and must not grow without bound.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

# Why an email did not go out, and will not go by itself (drip_failed_total{reason}).
PERMANENT = "permanent"  # the server refused it (5xx): `failed`
TRANSIENT = "transient"  # temporary failures for longer than DRIP_RETRY_FOR: `failed`
UNKNOWN = "unknown"  # the outcome is not known (cut off after the message, a lease lost mid-send)
RENDER = "render"  # the message could not be built: `failed`
STALE = "stale"  # a retry would have come after the step's age: `skipped`
FAILURE_REASONS = (PERMANENT, TRANSIENT, UNKNOWN, RENDER, STALE)


class Recorder(Protocol):
    """Counts what the sending and ticking code did. Every method is cheap and never raises for
    a value it is meant to take (it runs once per email)."""

    def sent(self, count: int = 1) -> None:
        """Emails the server accepted (250), recorded `sent`."""

    def failed(self, reason: str, count: int = 1) -> None:
        """Emails that will not go by themselves; `reason` is one of FAILURE_REASONS."""

    def retried(self, count: int = 1) -> None:
        """Emails put back to be tried again later (`retry`): a temporary failure."""

    def send_seconds(self, seconds: float) -> None:
        """How long one send took: the SMTP exchange, from the first command to the reply to
        the message (less the time spent building the next message meanwhile)."""

    def tick_seconds(self, seconds: float) -> None:
        """How long one tick took: taking expired leases back, claiming, enqueueing."""

    def rate_limited(self, seconds: float) -> None:
        """Time a worker waited for the global send-rate limit (DRIP_RATE_LIMIT)."""


class NullRecorder:
    """Records nothing: the default of the Sender and the Ticker."""

    def sent(self, count: int = 1) -> None:
        pass

    def failed(self, reason: str, count: int = 1) -> None:
        pass

    def retried(self, count: int = 1) -> None:
        pass

    def send_seconds(self, seconds: float) -> None:
        pass

    def tick_seconds(self, seconds: float) -> None:
        pass

    def rate_limited(self, seconds: float) -> None:
        pass


def check_reason(reason: str) -> str:
    """`reason` if it is one of FAILURE_REASONS (anything else is a bug in the caller)."""
    if reason not in FAILURE_REASONS:
        raise ValueError(f"not a failure reason: {reason!r}; use one of {FAILURE_REASONS}")
    return reason


@dataclass
class MemoryRecorder:
    """Keeps every count and duration in memory, for tests."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    sends: list[float] = field(default_factory=list)
    ticks: list[float] = field(default_factory=list)
    waited: float = 0.0

    def sent(self, count: int = 1) -> None:
        self.counts["sent"] += count

    def failed(self, reason: str, count: int = 1) -> None:
        self.failures[check_reason(reason)] += count

    def retried(self, count: int = 1) -> None:
        self.counts["retried"] += count

    def send_seconds(self, seconds: float) -> None:
        self.sends.append(seconds)

    def tick_seconds(self, seconds: float) -> None:
        self.ticks.append(seconds)

    def rate_limited(self, seconds: float) -> None:
        self.waited += seconds
