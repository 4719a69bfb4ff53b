"""The relay's circuit breaker: after a send whose outcome is unknown, or a relay that cannot be
used as configured, stop sending for a while.

A relay or content filter that hangs or drops the connection after the body may have delivered
the message, or not: each such send is an `unknown` that a person has to sort out. A relay whose
certificate does not verify, or that would get the password unencrypted, fails every message
alike until an operator fixes it. So one is enough to stop: every worker process (on every
machine, through Redis) holds off for a back-off that doubles with each trip in a row (1 minute
up to 15), and the rows wait, untried.

The key names the relay by a hash of its host and port: no credentials, no patient data.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import redis

log = logging.getLogger("drip.breaker")

FIRST_PAUSE = 60.0
LONGEST_PAUSE = 900.0
MEMORY = 3600  # seconds: trips within this long count as "in a row"


class Breaker(Protocol):
    def open_for(self) -> float:
        """Seconds until sending may start again; 0 when closed."""

    def trip(self) -> float:
        """Open (again): every process stops sending for the returned number of seconds."""


def pause(trips: int) -> float:
    return min(LONGEST_PAUSE, FIRST_PAUSE * float(1 << min(max(trips - 1, 0), 10)))


@dataclass
class LocalBreaker:
    """One process's breaker (tests, and a worker without Redis)."""

    monotonic: Callable[[], float] = time.monotonic
    until: float = 0.0
    trips: int = 0
    last_trip: float = field(default=-MEMORY)

    def open_for(self) -> float:
        return max(0.0, self.until - float(self.monotonic()))

    def trip(self) -> float:
        now = self.monotonic()
        self.trips = self.trips + 1 if now - self.last_trip < MEMORY else 1
        self.last_trip, seconds = now, pause(self.trips)
        self.until = now + seconds
        log.warning("circuit breaker open for %.0f s (trip %d)", seconds, self.trips)
        return seconds


class RedisBreaker:
    """The breaker shared by every worker process, held in Redis (keys expire by themselves)."""

    def __init__(self, client: redis.Redis, relay: str) -> None:
        name = hashlib.sha256(relay.encode()).hexdigest()[:16]
        self.client, self.open_key, self.trips_key = (
            client,
            f"drip:breaker:{name}",
            f"drip:breaker:{name}:trips",
        )

    def open_for(self) -> float:
        try:
            ms = int(cast(int, self.client.pttl(self.open_key)))  # -2: no key, -1: no expiry
        except redis.RedisError:
            return 0.0  # no Redis, no shared breaker: the batch's own stop still holds
        return ms / 1000 if ms > 0 else 0.0

    def trip(self) -> float:
        try:
            trips = int(cast(int, self.client.incr(self.trips_key)))
            self.client.expire(self.trips_key, MEMORY)
            seconds = pause(trips)
            self.client.set(self.open_key, "1", px=int(seconds * 1000))
        except redis.RedisError:
            log.warning("circuit breaker: Redis unreachable; only this batch stops")
            return 0.0
        log.warning("circuit breaker open for %.0f s (trip %d)", seconds, trips)
        return seconds


def relay_name(mail_url: str) -> str:
    """What names a relay in the breaker's key: scheme, host and port, never credentials."""
    from urllib.parse import urlsplit

    parts = urlsplit(mail_url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}"
