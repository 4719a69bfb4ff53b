"""The one clock of the program.

Code that plans, claims or expires takes `now` as an argument; only entry points ask a Clock.
`DRIP_NOW` starts the calendar at a chosen instant and lets it run on at normal speed, so leases,
back-off and send windows behave exactly as they will for real (dry runs, tests, the demo).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Clock:
    """Real time, optionally shifted so that it reads `start` at the moment it was made."""

    start: datetime | None = None
    _offset: timedelta = field(init=False, default=timedelta(0))

    def __post_init__(self) -> None:
        if self.start is not None:
            self._offset = self.start.astimezone(UTC) - utcnow()

    def now(self) -> datetime:
        return utcnow() + self._offset

    def monotonic(self) -> float:
        return time.monotonic()


def parse_instant(text: str) -> datetime:
    """An ISO-8601 instant; without an offset it is taken as UTC."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
