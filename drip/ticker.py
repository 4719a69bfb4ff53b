"""The ticker: every DRIP_TICK_SECONDS, take expired leases back and claim what is due.

Claimed ids go to Redis in batches of DRIP_BATCH_SIZE. The ticker stops claiming while the send
queue already holds enough work for a while: a claimed row waiting in Redis longer than its lease
would be claimed again (harmless, but wasted), and rows left in the database cost nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Engine

from drip.claims import claim_due, expire_leases, release
from drip.clock import Clock
from drip.db import transaction
from drip.settings import Settings

log = logging.getLogger("drip.ticker")

MAX_QUEUED_BATCHES = 20
MAX_BATCHES_PER_TICK = 50


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

    def tick(self) -> TickReport:
        report = TickReport()
        with transaction(self.engine) as session:
            report.released, report.unknown = expire_leases(session, now=self.clock.now())
        lease = timedelta(seconds=self.settings.lease_seconds)
        while report.batches < MAX_BATCHES_PER_TICK:
            if self.queue_depth() >= MAX_QUEUED_BATCHES:
                report.queue_full = True
                break
            with transaction(self.engine) as session:
                ids = claim_due(
                    session, now=self.clock.now(), limit=self.settings.batch_size, lease=lease
                )
            if not ids:
                break
            self._hand_over(ids)
            report.claimed += len(ids)
            report.batches += 1
            if len(ids) < self.settings.batch_size:
                break
        if report.claimed or report.released or report.unknown:
            log.info("tick: %s", report.as_dict())
        return report

    def _hand_over(self, ids: list[int]) -> None:
        try:
            self.enqueue(ids)
        except Exception:
            # The broker refused: give the rows back now rather than at lease expiry.
            with transaction(self.engine) as session:
                release(session, ids, now=self.clock.now())
            raise
