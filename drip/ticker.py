"""The ticker: every DRIP_TICK_SECONDS, claim what is due; every few seconds, take leases back.

One transaction claims what the tick will enqueue; the ids go to Redis in batches of
DRIP_BATCH_SIZE. The ticker stops claiming while the send
queue already holds enough work for a while: a claimed row waiting in Redis longer than its lease
would be claimed again (harmless, but wasted), and rows left in the database cost nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine

from drip.claims import claim_due, expire_leases, release
from drip.clock import Clock
from drip.db import transaction
from drip.recorder import UNKNOWN, NullRecorder, Recorder
from drip.settings import Settings

log = logging.getLogger("drip.ticker")

MAX_QUEUED_BATCHES = 20
MAX_BATCHES_PER_TICK = 50
EXPIRE_EVERY = timedelta(seconds=5)


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
