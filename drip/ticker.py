"""The ticker: every DRIP_TICK_SECONDS, claim what is due; every few seconds, take leases back.

One transaction claims what the tick will enqueue; the ids go to Redis in batches of
DRIP_BATCH_SIZE. The ticker stops claiming while the send
queue already holds enough work for a while: a claimed row waiting in Redis longer than its lease
would be claimed again (harmless, but wasted), and rows left in the database cost nothing.

Each tick that ran to its end leaves a heartbeat in Redis (HEARTBEAT_KEY: when, on which host,
at which interval), which `drip status` and `drip doctor` read to tell whether ticks still come.
It lives in Redis, not the database: it is one SET per tick (a database row would take SQLite's
write lock every tick, and need a migration), a tick cannot run without Redis anyway (beat sends
it through Redis, and it enqueues there), and it is about processes, not patients: when Redis is
gone, "when did a ticker last run" is honestly unknown.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from drip.claims import claim_due, expire_leases, release
from drip.clock import Clock, parse_instant, utcnow
from drip.db import transaction
from drip.recorder import UNKNOWN, NullRecorder, Recorder
from drip.settings import Settings

log = logging.getLogger("drip.ticker")

MAX_QUEUED_BATCHES = 20
MAX_BATCHES_PER_TICK = 50
EXPIRE_EVERY = timedelta(seconds=5)
HEARTBEAT_KEY = "drip:ticker:last"
# A tick may wait behind send batches in a busy worker's queue, so "late" allows several
# intervals, and never less than a minute.
LATE_AFTER_TICKS = 3
LATE_AFTER_AT_LEAST = timedelta(minutes=1)


@dataclass
class TickReport:
    """What one tick did."""

    claimed: int = 0
    batches: int = 0
    released: int = 0
    unknown: int = 0
    queue_full: bool = False

    def as_dict(self) -> dict[str, int | bool]:
        return dict(self.__dict__)


@dataclass
class Ticker:
    """Claims due rows and hands their ids to `enqueue`; `queue_depth` counts queued batches."""

    engine: Engine
    settings: Settings
    clock: Clock
    enqueue: Callable[[list[int]], None]
    queue_depth: Callable[[], int] = field(default=lambda: 0)
    recorder: Recorder = field(default_factory=NullRecorder)
    monotonic: Callable[[], float] = time.monotonic
    heartbeat: Callable[[], None] = field(default=lambda: None)  # after each tick that ran
    _expired_at: datetime | None = field(default=None, init=False, repr=False)

    def tick(self) -> TickReport:
        started = self.monotonic()
        report = TickReport()
        try:
            self._expire(report)
            room = min(MAX_QUEUED_BATCHES - self.queue_depth(), MAX_BATCHES_PER_TICK)
            if room <= 0:
                report.queue_full = True
            else:
                self._claim(room, report)
        finally:
            self.recorder.tick_seconds(self.monotonic() - started)
        if report.claimed or report.released or report.unknown:
            log.info("tick: %s", report.as_dict())
        self.heartbeat()
        return report

    def _expire(self, report: TickReport) -> None:
        """Take expired leases back, at most every EXPIRE_EVERY (a tenth of a lease, if that is
        less) of the calendar: a lease lasts minutes, and ticks come several times a second."""
        now = self.clock.now()
        last = self._expired_at
        if last is not None and last <= now < last + min(EXPIRE_EVERY, self.settings.lease / 10):
            return
        with transaction(self.engine) as session:
            report.released, report.unknown = expire_leases(
                session, now=now, retry_for=self.settings.retry_for
            )
        self._expired_at = now
        if report.unknown:  # sends whose lease ran out mid-way: their worker died
            self.recorder.failed(UNKNOWN, report.unknown)

    def _claim(self, batches: int, report: TickReport) -> None:
        """Claim up to `batches` batches in one transaction, then enqueue them one by one."""
        size, lease = self.settings.batch_size, self.settings.lease
        with transaction(self.engine) as session:
            ids = claim_due(session, now=self.clock.now(), limit=batches * size, lease=lease)
        for start in range(0, len(ids), size):
            batch = ids[start : start + size]
            try:
                self.enqueue(batch)
            except Exception:
                # The broker refused: give this batch and the ones after it back now, rather than
                # at lease expiry.
                with transaction(self.engine) as session:
                    release(session, ids[start:], now=self.clock.now())
                raise
            report.claimed += len(batch)
            report.batches += 1


@dataclass(frozen=True)
class Heartbeat:
    """When a tick last ran to its end (real UTC time, not DRIP_NOW's calendar: it is about
    processes being alive), on which host, and how often beat sends one."""

    at: datetime
    host: str
    tick_seconds: float

    def age(self, now: datetime) -> timedelta:
        return max(now - self.at, timedelta(0))

    @property
    def late_after(self) -> timedelta:
        return max(LATE_AFTER_AT_LEAST, LATE_AFTER_TICKS * timedelta(seconds=self.tick_seconds))

    def late(self, now: datetime) -> bool:
        return self.age(now) > self.late_after

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(timespec="seconds"), "host": self.host,
                "tick_seconds": self.tick_seconds}  # fmt: skip


def record_heartbeat(client: Any, *, tick_seconds: float, at: datetime | None = None) -> None:
    """Leave this tick's heartbeat in Redis (`client`: a redis-py client)."""
    beat = Heartbeat(at or utcnow(), socket.gethostname(), tick_seconds)
    client.set(HEARTBEAT_KEY, json.dumps(beat.as_json()))


def parse_heartbeat(raw: bytes | str | None) -> Heartbeat | None:
    """The heartbeat stored under HEARTBEAT_KEY; None when there is none (or it is garbled:
    a value drip did not write says nothing about drip's ticks)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        return Heartbeat(
            parse_instant(value["at"]), str(value["host"]), float(value["tick_seconds"])
        )
    except (ValueError, KeyError, TypeError):
        return None
