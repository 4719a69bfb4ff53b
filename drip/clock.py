"""The one clock of the program.

Code that plans, claims or expires takes `now` as an argument; only entry points ask a Clock.
`DRIP_NOW` starts the calendar at a chosen instant and lets it run on at normal speed, so leases,
back-off and send windows behave exactly as they will for real (dry runs, tests, the demo). The
calendar reads DRIP_NOW at one real instant, the anchor, fixed when the settings are read: every
Clock made from those settings, in this process or in one forked from it, reads the same time.
`DRIP_NOW_FILE` does the same from an instant written in a file, read again on every call: one
process (the demo, a test) can move the calendar of every worker and ticker at once, and from
each write the clock again runs on at normal speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Clock:
    """Real time, optionally shifted so that it read `start` at the real instant `anchor`
    (without an anchor, at the moment the Clock was made)."""

    start: datetime | None = None
    file: Path | None = None
    anchor: datetime | None = None
    _offset: timedelta = field(init=False, default=timedelta(0))

    def __post_init__(self) -> None:
        if self.start is not None:
            self._offset = self.start.astimezone(UTC) - (self.anchor or utcnow())

    def now(self) -> datetime:
        if self.file is not None:
            return read_clock_file(self.file)
        return utcnow() + self._offset

    def monotonic(self) -> float:
        return time.monotonic()


def parse_instant(text: str) -> datetime:
    """An ISO-8601 instant; without an offset it is taken as UTC."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# A calendar started at year 9999 or 0001 overflows the first date planned from it; drip plans
# within this century and the next.
CALENDAR = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))


def parse_calendar_instant(text: str) -> datetime:
    """parse_instant, for a calendar to run from (DRIP_NOW, DRIP_NOW_FILE); ValueError saying
    what is wrong, written to follow the value it is about."""
    earliest, latest = CALENDAR
    outside = f"is outside {earliest:%Y-%m-%d} to {latest:%Y-%m-%d}, the range drip plans in"
    try:
        value = parse_instant(text)
    except OverflowError:  # in range as written, beyond year 9999 in UTC
        raise ValueError(outside) from None
    except ValueError:
        raise ValueError("is not an ISO-8601 instant") from None
    if not earliest <= value < latest:
        raise ValueError(outside)
    return value


def read_clock_file(path: Path) -> datetime:
    """The instant written in `path`, moved on by the time since it was written."""
    stat = path.stat()
    written = datetime.fromtimestamp(stat.st_mtime, UTC)
    return parse_calendar_instant(path.read_text()) + (utcnow() - written)


def write_clock_file(path: Path, instant: datetime) -> None:
    """Move every clock reading `path` to `instant` (atomically: readers never see half)."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(instant.astimezone(UTC).isoformat())
    temp.replace(path)


def iso(value: datetime | None) -> str | None:
    """An instant as ISO-8601 to the second, for JSON output; None stays None."""
    return value.isoformat(timespec="seconds") if value else None
