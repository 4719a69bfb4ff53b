"""Durations (+1d, 36h) and times of day (09:30) as campaign.toml and the settings write them.

Their own module, importing nothing of drip: campaigns parses steps with them and planning parses
send windows, and campaigns need not import planning (which reads campaigns' steps).
"""

from __future__ import annotations

import re
from datetime import time, timedelta

_DURATION = re.compile(r"^(?P<sign>[+-])?(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?$")
_HHMM = re.compile(r"^(\d{1,2}):(\d{2})$")


def parse_duration(text: str) -> timedelta:
    """'+1d', '-2d', '36h', '1d12h', '0d' → timedelta. Raises ValueError."""
    match = _DURATION.match(text.strip())
    if not match or not any(match.group(g) for g in "dhm"):
        raise ValueError(f"{text!r} is not a duration like +1d, -2d, 36h or 1d12h")
    value = timedelta(
        days=int(match["d"] or 0), hours=int(match["h"] or 0), minutes=int(match["m"] or 0)
    )
    return -value if match["sign"] == "-" else value


def format_duration(value: timedelta) -> str:
    """The inverse of parse_duration for a whole number of minutes: timedelta(days=1, hours=12)
    → '1d12h'; zero → '0'."""
    minutes = int(value.total_seconds() // 60)
    sign, minutes = ("-", -minutes) if minutes < 0 else ("", minutes)
    days, rest = divmod(minutes, 1440)
    hours, minutes = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    return sign + "".join(parts) if parts else "0"


def parse_clock_time(text: str) -> time:
    """'09:30' → time(9, 30). Raises ValueError."""
    match = _HHMM.match(text.strip())
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise ValueError(f"{text!r} is not a time of day like 09:30")
    return time(int(match[1]), int(match[2]))
