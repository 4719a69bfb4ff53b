"""The ticker sizes each claim to what the workers drain, to DRIP_RATE_LIMIT, to the lease and to
DRIP_DAILY_LIMIT (drip.ticker). The drain is simulated by moving rows on in the database, on an
injected clock: nothing here depends on the speed of the machine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import Engine, func, select, update

from drip.broker import EmbeddedRedis, redis_client
from drip.clock import Clock
from drip.models import Delivery
from drip.ratelimit import LocalLimiter
from drip.settings import Settings
from drip.ticker import (
    COLD_BATCHES,
    Drain,
    LocalFeedMemory,
    RedisFeedMemory,
    Ticker,
    TickReport,
)

Drip = Callable[..., Result]


class Queue:
    """The send queue, as the ticker sees it: batches enqueued, and how many still wait."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.waiting = 0

    def enqueue(self, ids: list[int]) -> None:
        self.batches.append(ids)
        self.waiting += 1

    def depth(self) -> int:
        return self.waiting


class Seconds:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def patients(drip: Drip) -> Callable[[int], None]:
    def enrol(n: int) -> None:
        body = "email,first_name\n" + "".join(f"p{i}@example.com,P{i}\n" for i in range(n))
        result = drip("enroll", "--csv", "-", "--campaign", "ketamine-onboarding", input=body)
        assert result.exit_code == 0, result.output

    return enrol


def ticker(
    engine: Engine, settings: Settings, queue: Queue, seconds: Seconds, **fields: object
) -> Ticker:
    return Ticker(
        engine,
        settings,
        Clock(settings.now),
        queue.enqueue,
        queue.depth,
        memory=LocalFeedMemory(seconds),
        **fields,  # type: ignore[arg-type]
    )


def drain(engine: Engine, queue: Queue) -> int:
    """The workers took every batch and sent every row."""
    with engine.begin() as c:
        done = c.execute(update(Delivery).where(Delivery.state == "claimed").values(state="sent"))
    queue.waiting = 0
    return int(done.rowcount)


def states(engine: Engine) -> dict[str, int]:
    with engine.connect() as c:
        return dict(c.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())


# --- the drain rate ------------------------------------------------------------------------------


def test_nothing_measured_yet_is_a_drain_rate_of_zero() -> None:
    assert Drain().observe(100.0, 0, 0) == 0.0


def test_with_batches_still_queued_the_rows_that_left_claimed_are_the_drain_rate() -> None:
    drain = Drain(at=100.0, claimed=1000)
    assert drain.observe(102.0, 200, depth=3) == 400.0
    assert (drain.at, drain.claimed) == (102.0, 200)  # the next measurement starts here


def test_feeds_closer_together_than_half_a_second_measure_over_several() -> None:
    drain = Drain(at=100.0, claimed=1000, rate=50.0)
    assert drain.observe(100.2, 900, depth=2) == 50.0  # too short to say
    drain.claimed += 100  # that feed claimed 100 more
    assert drain.observe(100.4, 800, depth=2) == 50.0
    assert drain.observe(101.0, 400, depth=1) == (50.0 + 700) / 2  # 700 rows/s, smoothed


def test_a_queue_that_ran_dry_with_more_due_doubles_the_estimate() -> None:
    drain = Drain(at=100.0, claimed=1000, rate=800.0, full=True)
    assert drain.observe(105.0, 0, depth=0) == 1600.0  # it drained 1,000 rows in under 5 s


def test_a_queue_that_ran_dry_because_nothing_more_was_due_keeps_the_estimate() -> None:
    drain = Drain(at=100.0, claimed=10, rate=800.0, full=False)
    assert drain.observe(105.0, 0, depth=0) == 800.0


def test_a_measure_too_old_is_forgotten() -> None:
    drain = Drain(at=100.0, claimed=10, rate=800.0)
    assert drain.observe(100.0 + 3600, 0, depth=0) == 0.0


# --- how much one feed claims ------------------------------------------------------------------


def sized(settings: Settings, rate: float, claimed: int = 0, **changes: object) -> int:
    s = replace(settings, **changes)  # type: ignore[arg-type]
    return Ticker(None, s, Clock(), lambda ids: None).wanted(rate, claimed, TickReport())  # type: ignore[arg-type]


def test_with_nothing_measured_a_feed_claims_twenty_batches(settings: Settings) -> None:
    assert sized(settings, 0.0) == COLD_BATCHES * settings.batch_size


def test_a_feed_claims_enough_for_the_next_tick_at_the_measured_rate(settings: Settings) -> None:
    # 1,600 rows/s with a 5 s tick: 6 s of work, not 20 batches of 100
    assert sized(settings, 1600.0, tick_seconds=5.0) == 9600
    assert sized(settings, 1600.0, claimed=9000, tick_seconds=5.0) == 600
    assert sized(settings, 1600.0, claimed=9034, tick_seconds=5.0) == 500  # whole batches


def test_a_feed_never_claims_more_than_the_workers_drain_in_half_a_lease(
    settings: Settings,
) -> None:
    assert sized(settings, 10.0, tick_seconds=3600.0, lease_seconds=300) == 1500
    assert sized(settings, 5.0, lease_seconds=300) == 700  # under 20 batches: a slow relay


def test_a_feed_keeps_at_least_twenty_batches_claimed_when_they_drain_within_the_lease(
    settings: Settings,
) -> None:
    assert sized(settings, 100.0, tick_seconds=0.2) == COLD_BATCHES * settings.batch_size


def test_drip_rate_limit_caps_what_a_feed_claims(settings: Settings) -> None:
    assert sized(settings, 1600.0, rate_limit=20.0, tick_seconds=5.0) == 120
    assert sized(settings, 0.0, rate_limit=20.0, tick_seconds=5.0) == 120  # even when cold
    assert sized(settings, 0.0, rate_limit=0.5, tick_seconds=5.0, lease_seconds=10) == 2


# --- the ticker with a database ------------------------------------------------------------------


def test_a_tick_after_the_workers_drained_claims_what_they_drain_not_a_fixed_amount(
    engine: Engine, settings: Settings, patients: Callable[[int], None]
) -> None:
    patients(1000)
    queue, seconds = Queue(), Seconds()
    small = replace(settings, batch_size=5, tick_seconds=5.0)
    line = ticker(engine, small, queue, seconds)
    assert line.tick().claimed == COLD_BATCHES * 5  # nothing measured: 100 rows
    assert drain(engine, queue) == 100
    seconds.t += 1.0  # the workers drained 100 rows in a second and then waited
    second = line.tick()
    assert second.drain_rate == 100.0 and second.claimed == 600  # 6 s of work at 100 rows/s
    assert len(queue.batches[-1]) == 5 and states(engine)["claimed"] == 600


def test_a_worker_asks_for_more_only_while_a_tick_ran_lately(
    engine: Engine, settings: Settings, patients: Callable[[int], None]
) -> None:
    patients(300)
    queue, seconds = Queue(), Seconds()
    line = ticker(engine, replace(settings, batch_size=5), queue, seconds)
    report = TickReport()
    line.feed(report, nudge=True)
    assert report.claimed == 0  # beat has not ticked: the workers claim nothing by themselves
    line.tick()
    drain(engine, queue)
    seconds.t += 1.0
    line.feed(report, nudge=True)
    assert report.claimed == 200  # the rest, at once: no wait for the next tick
    seconds.t += 3600.0  # an hour without a tick (beat stopped)
    drain(engine, queue)
    patients_left = states(engine).get("scheduled", 0)
    late = TickReport()
    line.feed(late, nudge=True)
    assert late.claimed == 0 and states(engine).get("scheduled", 0) == patients_left


def test_a_feed_claims_no_more_than_is_left_of_the_daily_quota(
    engine: Engine, settings: Settings, patients: Callable[[int], None]
) -> None:
    patients(40)
    queue, seconds = Queue(), Seconds()
    limiter = LocalLimiter(daily=7, clock=seconds)
    limiter.take(2)  # two sent already today
    capped = replace(settings, daily_limit=7)
    assert ticker(engine, capped, queue, seconds, limiter=limiter).tick().claimed == 5


def test_while_the_daily_quota_is_spent_nothing_is_claimed_and_the_rows_are_untouched(
    engine: Engine, settings: Settings, patients: Callable[[int], None]
) -> None:
    patients(10)
    queue, seconds = Queue(), Seconds()
    limiter = LocalLimiter(daily=3, clock=seconds)
    limiter.take(3)

    def snapshot() -> list[tuple[int, str, int, datetime]]:
        with engine.connect() as c:
            return list(
                c.execute(
                    select(Delivery.id, Delivery.state, Delivery.attempts, Delivery.updated_at)
                )
            )

    before = snapshot()
    line = ticker(engine, replace(settings, daily_limit=3), queue, seconds, limiter=limiter)
    report = line.tick()
    assert report.claimed == 0 and report.daily_spent and queue.batches == []
    assert snapshot() == before


# --- the feed's memory in Redis ------------------------------------------------------------------


@pytest.fixture
def redis_memory(tmp_path: Path) -> Iterator[RedisFeedMemory]:
    server = EmbeddedRedis(tmp_path)
    client = redis_client(server.start())
    yield RedisFeedMemory(client)
    client.close()
    server.stop()


def test_one_feeder_at_a_time_and_what_it_measured_is_shared(
    redis_memory: RedisFeedMemory,
) -> None:
    other = RedisFeedMemory(redis_memory.client)
    with redis_memory.hold() as drain:
        assert drain == Drain()
        with other.hold() as second:
            assert second is None  # another process is feeding
        assert drain is not None
        drain.at, drain.claimed, drain.rate, drain.full = redis_memory.now(), 700, 812.5, True
    with other.hold() as shared:
        assert shared is not None
        assert (shared.claimed, shared.rate, shared.full) == (700, 812.5, True)
