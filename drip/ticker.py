"""The ticker: claims what is due, as much as the workers drain; takes expired leases back.

Every DRIP_TICK_SECONDS a tick (sent by beat) feeds the send queue; so does a worker process
that finishes a batch and finds the queue nearly empty (`feed(nudge=True)`), as long as a tick
ran lately. So throughput is bounded by the workers, the relay and DRIP_RATE_LIMIT, never by the
tick: with a fixed claim per tick, the default 5 s tick capped drip near 400 emails/s.

How many rows are kept claimed (`Ticker.wanted`; a feed claims the difference):
- enough for the next tick and a second more, at the rate the workers were measured to drain
  (rows that left `claimed` per second, over at least MEASURE_AFTER; `Drain.observe`), and never
  less than COLD_BATCHES batches (what one tick queued before drip measured anything);
- never more than they drain in half a lease: a claimed row must not wait in Redis past its lease
  (it would be taken back as a try);
- with DRIP_RATE_LIMIT, no more than the limit lets out until the next tick and a second more;
- in whole batches, unless fewer than two are wanted;
- under DRIP_DAILY_LIMIT, no more than what is left of the quota: while it is spent nothing is
  claimed, and the rows stay `scheduled`, untouched.

Feeds hold a lock and share what they measured through Redis (`RedisFeedMemory`), because
successive ticks run in any worker process on any machine. Losing it costs one cold feed.
One transaction claims at most CHUNK_BATCHES batches (SQLite's write lock stays short); the ids
go to Redis in batches of DRIP_BATCH_SIZE. At most one row per patient is in flight
(drip.claims).

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
import math
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

import redis
from redis.exceptions import LockError
from sqlalchemy import Engine

from drip.claims import claim_due, claimed_count, expire_leases, release
from drip.clock import Clock, parse_instant, utcnow
from drip.db import transaction
from drip.ratelimit import Limiter
from drip.recorder import UNKNOWN, NullRecorder, Recorder
from drip.settings import Settings

log = logging.getLogger("drip.ticker")

COLD_BATCHES = 20  # a feed with no drain rate measured claims this many batches
CHUNK_BATCHES = 20  # batches claimed in one transaction
AHEAD_SECONDS = 1.0  # a feed lasts until the next tick and this much longer
LEASE_SHARE = 0.5  # the rows claimed are drained within this share of a lease
LOW_WATER = 1  # a worker finishing a batch feeds when no more batches than this are queued
MEASURE_AFTER = 0.5  # seconds: a shorter interval says too little about the drain rate
MEASURE_WITHIN = 120.0  # seconds: what was measured longer ago is no longer the drain rate
EXPIRE_EVERY = timedelta(seconds=5)
HEARTBEAT_KEY = "drip:ticker:last"
# A tick may wait behind send batches in a busy worker's queue, so "late" allows several
# intervals, and never less than a minute.
LATE_AFTER_TICKS = 3
LATE_AFTER_AT_LEAST = timedelta(minutes=1)
LOCK_SECONDS = 15  # a feeder that died holding the lock holds up feeding this long at most


@dataclass
class TickReport:
    """What one tick (or feed) did."""

    claimed: int = 0
    batches: int = 0
    released: int = 0
    unknown: int = 0
    wanted: int = 0  # rows the feed asked for
    drain_rate: float = 0.0  # rows per second the workers drain, as measured (0: not yet)
    daily_spent: bool = False  # DRIP_DAILY_LIMIT is used up: nothing was claimed
    busy: bool = False  # another process was feeding: this one did not

    def as_dict(self) -> dict[str, int | float | bool]:
        return dict(self.__dict__)


@dataclass
class Drain:
    """What feeds remember between them (times in the memory's seconds): the drain rate, and
    the measurement under way."""

    rate: float = 0.0  # rows per second the workers drain; 0: not measured yet
    at: float = 0.0  # when the measurement under way began (a feed)
    claimed: int = 0  # rows claimed right after that feed, plus every row claimed since
    dry: bool = False  # a feed since then found the send queue empty
    full: bool = False  # the last feed got all the rows it asked for: more were due
    ticked_at: float = 0.0  # the last feed that was a tick (beat is alive)

    def observe(self, now: float, claimed: int, depth: int) -> float:
        """The drain rate, given the rows `claimed` and the batches queued (`depth`) now.

        Only feeds add to the queue, so one that finds batches still queued knows the queue
        never ran dry since the feed before: the workers drained all they could, and the rows
        that left `claimed` per second are their rate. If it ran dry, they could have drained
        more; if more rows were due than the last feed claimed, the estimate doubles."""
        elapsed = now - self.at
        if not self.at or not 0 <= elapsed <= MEASURE_WITHIN or claimed > self.claimed:
            if self.at and elapsed > MEASURE_WITHIN:
                self.rate = 0.0  # too long ago to say what the workers drain now
            self._restart(now, claimed)
            return self.rate
        self.dry = self.dry or depth == 0
        if elapsed < MEASURE_AFTER:
            return self.rate  # too short to say; the measurement goes on
        observed = (self.claimed - claimed) / elapsed
        if not self.dry:
            self.rate = (self.rate + observed) / 2 if self.rate else observed
        else:
            self.rate = max(observed, self.rate * 2 if self.full else self.rate)
        self._restart(now, claimed)
        return self.rate

    def _restart(self, now: float, claimed: int) -> None:
        self.at, self.claimed, self.dry = now, claimed, False


class FeedMemory(Protocol):
    def now(self) -> float:
        """Seconds, on one clock for every feeder."""

    def hold(self) -> AbstractContextManager[Drain | None]:
        """The Drain, held by this feeder alone until the block ends (then saved); None when
        another feeder holds it."""


@dataclass
class LocalFeedMemory:
    """One process's memory (tests, and a ticker without Redis)."""

    clock: Callable[[], float] = time.monotonic
    drain: Drain = field(default_factory=Drain)
    held: bool = False

    def now(self) -> float:
        return self.clock()

    @contextmanager
    def hold(self) -> Iterator[Drain | None]:
        if self.held:
            yield None
            return
        self.held = True
        try:
            yield self.drain
        finally:
            self.held = False


class RedisFeedMemory:
    """The memory shared by every feeder, in Redis: one small hash and a lock."""

    KEY = "drip:feed"
    TTL = 3600  # seconds: an hour without a feed, and the drain rate is measured afresh

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def now(self) -> float:
        seconds, micros = cast(tuple[int, int], self.client.time())
        return seconds + micros / 1e6

    @contextmanager
    def hold(self) -> Iterator[Drain | None]:
        lock = self.client.lock(f"{self.KEY}:lock", timeout=LOCK_SECONDS, blocking=False)
        if not lock.acquire():
            yield None
            return
        try:
            raw = cast(dict[bytes, bytes], self.client.hgetall(self.KEY))
            drain = Drain(
                **{
                    name: type(default)(float(raw[name.encode()]))
                    for name, default in asdict(Drain()).items()
                    if name.encode() in raw
                }
            )
            yield drain
            values = {name: float(value) for name, value in asdict(drain).items()}
            self.client.hset(self.KEY, mapping=values)
            self.client.expire(self.KEY, self.TTL)
        finally:
            with suppress(LockError, redis.RedisError):
                lock.release()


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
    memory: FeedMemory = field(default_factory=LocalFeedMemory)
    limiter: Limiter | None = None
    _expired_at: datetime | None = field(default=None, init=False, repr=False)

    def tick(self) -> TickReport:
        started = self.monotonic()
        report = TickReport()
        try:
            self._expire(report)
            self.feed(report)
        finally:
            self.recorder.tick_seconds(self.monotonic() - started)
        if report.claimed or report.released or report.unknown:
            log.info("tick: %s", report.as_dict())
        self.heartbeat()
        return report

    def feed(self, report: TickReport, *, nudge: bool = False) -> None:
        """Claim what the workers will drain (see the module's docstring). `nudge`: asked by a
        worker whose queue ran low, which only keeps up a flow a tick started lately."""
        with self.memory.hold() as drain:
            if drain is None:
                report.busy = True
                return
            now = self.memory.now()
            if nudge and now - drain.ticked_at > 10 * self.settings.tick_seconds + 10:
                return  # no tick lately: beat is stopped, and so is claiming
            with transaction(self.engine) as session:
                claimed = claimed_count(session)
            rate = drain.observe(now, claimed, self.queue_depth())
            report.drain_rate = round(rate, 1)
            report.wanted = self.wanted(rate, claimed, report)
            if report.wanted > 0:
                self._claim(report.wanted, report)
            drain.claimed += report.claimed
            drain.full = report.wanted > 0 and report.claimed >= report.wanted
            if not nudge:
                drain.ticked_at = now

    def wanted(self, rate: float, claimed: int, report: TickReport) -> int:
        """How many rows to claim now, with `claimed` already claimed and the workers draining
        `rate` rows per second (0: not measured)."""
        s = self.settings
        ahead, in_lease = s.tick_seconds + AHEAD_SECONDS, s.lease_seconds * LEASE_SHARE
        target = COLD_BATCHES * s.batch_size
        if rate:
            target = min(max(target, math.ceil(rate * ahead)), math.floor(rate * in_lease))
        if s.rate_limit:
            limited = min(math.ceil(s.rate_limit * ahead), math.floor(s.rate_limit * in_lease))
            target = min(target, limited)
        wanted = max(target, 1) - claimed
        if target >= 2 * s.batch_size:  # top up in whole batches: a batch of a few rows costs
            wanted -= wanted % s.batch_size  # nearly what a full one does
        if self.limiter is not None and s.daily_limit is not None:
            quota = self.limiter.daily_left()
            if quota.left is not None:
                report.daily_spent = quota.left <= 0
                wanted = min(wanted, quota.left - claimed)
        return max(wanted, 0)

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

    def _claim(self, wanted: int, report: TickReport) -> None:
        """Claim up to `wanted` rows, CHUNK_BATCHES batches per transaction, enqueueing each
        chunk's batches before claiming the next."""
        size, lease = self.settings.batch_size, self.settings.lease
        while report.claimed < wanted:
            limit = min(wanted - report.claimed, CHUNK_BATCHES * size)
            with transaction(self.engine) as session:
                ids = claim_due(session, now=self.clock.now(), limit=limit, lease=lease)
            self._enqueue(ids, report)
            if len(ids) < limit:
                return  # nothing more is due

    def _enqueue(self, ids: list[int], report: TickReport) -> None:
        size = self.settings.batch_size
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
