"""DRIP_RATE_LIMIT and DRIP_DAILY_LIMIT (drip.ratelimit): the Lua script on a real redis-server
under concurrent takers, and the in-process limiter beside it. Every test counts turns on an
injected clock: none depends on the speed of the machine."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from drip.broker import EmbeddedRedis, redis_client
from drip.ratelimit import (
    DAY,
    LOOKAHEAD,
    MINUTE,
    Grant,
    LocalLimiter,
    RedisLimiter,
    chunk_for,
)
from tests.polling import wait_until

T0 = 1_790_000_000.0  # an epoch instant (2026) the injected clocks start from


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private, real redis-server (never the machine's shared one: these tests FLUSHALL)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    yield server.start()
    server.stop()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis_client(redis_url)
    connection.flushall()
    yield connection
    connection.close()


class SharedClock:
    """An injected clock (epoch seconds) that several threads read and move."""

    def __init__(self, start: float = T0) -> None:
        self.value, self.lock = start, threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.value

    def advance(self, seconds: float) -> float:
        with self.lock:
            self.value += seconds
            return self.value


def most_in_any_window(instants: list[float], width: float = 1.0) -> int:
    """The most instants that fall in any half-open window [t, t + width), to the microsecond
    (the limiter's unit)."""
    ordered, most, first = sorted(round(t * 1e6) for t in instants), 0, 0
    for last, instant in enumerate(ordered):
        while ordered[first] <= instant - round(width * 1e6):
            first += 1
        most = max(most, last - first + 1)
    return most


def smallest_gap(instants: list[float]) -> float:
    ordered = sorted(round(t * 1e6) for t in instants)
    return min(b - a for a, b in zip(ordered, ordered[1:], strict=False)) / 1e6


def take_all(limiter: RedisLimiter | LocalLimiter, wanted: int = 1) -> tuple[list[float], Grant]:
    """One take, as absolute instants (on the limiter's clock) of the turns granted."""
    grant = limiter.take(wanted)
    return [grant.now + at for at in grant.turns()], grant


def takers(
    make: Callable[[], RedisLimiter],
    clock: SharedClock,
    *,
    threads: int,
    takes: int,
    step: float,
    wanted: int = 1,
    between: Callable[[int], None] = lambda i: None,
) -> list[float]:
    """`threads` takers, each with its own Redis connection, taking `takes` times while the
    clock moves on by `step` after each take; every turn granted, as an absolute instant."""
    granted: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def run(n: int) -> None:
        limiter = make()
        start.wait()
        for i in range(takes):
            turns, _ = take_all(limiter, wanted)
            with lock:
                granted.extend(turns)
            clock.advance(step)
            if n == 0:
                between(i)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    return granted


def test_concurrent_takers_never_get_more_turns_than_the_rate_in_any_second(
    client: redis.Redis, redis_url: str
) -> None:
    clock = SharedClock()
    rate = 20.0

    def make() -> RedisLimiter:
        return RedisLimiter(
            redis_client(redis_url), "smtp://relay:587", rate=rate, daily=None, clock=clock
        )

    granted = takers(make, clock, threads=8, takes=150, step=0.004)
    assert len(granted) > 50  # the takers asked for turns through seconds of the clock
    assert most_in_any_window(granted) <= math.ceil(rate)
    assert smallest_gap(granted) >= 1 / rate  # one turn per interval, never two


def test_takers_asking_for_several_turns_at_a_high_rate_still_keep_to_it(
    client: redis.Redis, redis_url: str
) -> None:
    clock, rate = SharedClock(), 1000.0
    assert chunk_for(rate) == 50

    def make() -> RedisLimiter:
        return RedisLimiter(
            redis_client(redis_url), "smtp://relay:587", rate=rate, daily=None, clock=clock
        )

    granted = takers(make, clock, threads=6, takes=100, step=0.01, wanted=chunk_for(rate))
    assert most_in_any_window(granted) <= rate
    assert most_in_any_window(granted, 0.1) <= rate / 10


def test_a_turn_further_ahead_than_the_lookahead_is_not_reserved_and_says_how_long_to_wait(
    client: redis.Redis,
) -> None:
    clock = SharedClock()
    limiter = RedisLimiter(client, "smtp://relay:587", rate=2.0, daily=None, clock=clock)
    first = limiter.take(1)  # a new schedule starts empty: its first turn is 1.5 s away
    assert first.count == 0 and first.wait == pytest.approx(0.5)
    clock.advance(first.wait)
    granted = [limiter.take(1) for _ in range(3)]
    assert [g.count for g in granted] == [1, 0, 0]
    assert granted[0].first == pytest.approx(LOOKAHEAD)
    assert granted[1].wait == pytest.approx(0.5)  # the next turn is 1.5 s away: not reserved
    clock.advance(0.5)
    assert limiter.take(1).count == 1


def test_flushall_mid_run_does_not_let_a_burst_through(client: redis.Redis, redis_url: str) -> None:
    clock, rate = SharedClock(), 10.0

    def make() -> RedisLimiter:
        return RedisLimiter(
            redis_client(redis_url), "smtp://relay:587", rate=rate, daily=None, clock=clock
        )

    def flush(i: int) -> None:
        if i in (40, 90):  # with turns reserved ahead by every taker
            client.flushall()

    granted = takers(make, clock, threads=6, takes=120, step=0.005, between=flush)
    assert most_in_any_window(granted) <= math.ceil(rate)
    assert smallest_gap(granted) >= 1 / rate


def test_the_daily_quota_counts_exactly_under_concurrent_takers(
    client: redis.Redis, redis_url: str
) -> None:
    clock = SharedClock()

    def make() -> RedisLimiter:
        return RedisLimiter(
            redis_client(redis_url), "smtp://relay:587", rate=None, daily=50, clock=clock
        )

    granted = takers(make, clock, threads=8, takes=20, step=0.5, wanted=3)
    assert len(granted) == 50
    limiter = make()
    refused = limiter.take(1)
    assert refused.count == 0 and refused.daily_spent
    assert limiter.daily_left().left == 0
    # the first sends fall out of the window 24 h (and at most a minute) after they were made
    assert DAY - MINUTE <= refused.wait <= DAY + MINUTE


def test_the_daily_quota_frees_as_the_first_sends_age_past_24_hours(client: redis.Redis) -> None:
    clock = SharedClock()
    limiter = RedisLimiter(client, "smtp://relay:587", rate=None, daily=10, clock=clock)
    assert limiter.take(4).count == 4
    clock.advance(3600)
    assert limiter.take(10).count == 6
    assert limiter.daily_left().left == 0
    clock.advance(DAY - 3600 + MINUTE)  # the first four have aged out, the six have not
    assert limiter.daily_left().left == 4
    assert limiter.take(10).count == 4
    clock.advance(3 * DAY)  # days without sending
    assert limiter.daily_left().left == 10


def test_turns_given_back_unused_return_to_the_daily_quota(client: redis.Redis) -> None:
    clock = SharedClock()
    limiter = RedisLimiter(client, "smtp://relay:587", rate=None, daily=5, clock=clock)
    grant = limiter.take(5)
    assert grant.count == 5 and limiter.daily_left().left == 0
    limiter.give_back(grant.minute, 2)
    assert limiter.daily_left().left == 2
    limiter.give_back(grant.minute, 9)  # never more than was counted
    assert limiter.daily_left().left == 5


def test_a_lost_daily_count_is_rebuilt_from_the_database_sends(client: redis.Redis) -> None:
    clock = SharedClock()
    sent = [T0 - 3600 - i for i in range(40)] + [T0 - DAY - 60]  # the last one is too old

    limiter = RedisLimiter(
        client, "smtp://relay:587", rate=None, daily=50, clock=clock, seed=lambda: sent
    )
    assert limiter.daily_left().left == 10
    assert limiter.take(20).count == 10
    client.flushall()  # Redis restarted: the count comes back from the database
    sent.extend(T0 for _ in range(10))
    assert limiter.take(1).daily_spent


def test_without_redis_no_turn_is_given(tmp_path: Path) -> None:
    gone = redis.Redis(unix_socket_path=str(tmp_path / "none.sock"), retry=Retry(NoBackoff(), 0))
    grant = RedisLimiter(gone, "smtp://relay:587", rate=5.0, daily=None).take(1)
    assert grant.count == 0 and grant.unavailable


def test_the_redis_clock_is_used_by_default(client: redis.Redis) -> None:
    limiter = RedisLimiter(client, "smtp://relay:587", rate=1000.0, daily=100)
    grant = wait_until(lambda: (g := limiter.take(3)).count and g, "a turn on Redis's clock")
    assert grant.count == 3 and 0 <= grant.first <= LOOKAHEAD
    assert abs(grant.now - time.time()) < 60
    assert limiter.daily_left().left == 97


def test_the_keys_name_the_relay_by_a_hash_never_its_credentials(client: redis.Redis) -> None:
    limiter = RedisLimiter(client, "smtp://relay.example:587", rate=5.0, daily=9)
    limiter.take(1)
    keys = b" ".join(client.keys("*"))
    assert b"relay.example" not in keys and keys.count(b"drip:") == 2


def test_the_local_limiter_keeps_the_same_rules() -> None:
    clock = SharedClock()
    limiter = LocalLimiter(rate=4.0, daily=30, clock=clock)
    granted: list[float] = []
    for _ in range(400):
        turns, grant = take_all(limiter, 2)
        granted += turns
        clock.advance(0.05)
    assert len(granted) == 30  # the daily quota
    assert most_in_any_window(granted) <= 4
    limiter.forget()  # the bucket lost: it starts empty, after every turn outstanding
    limiter.daily = None
    turns, _ = take_all(limiter)
    assert not turns or turns[0] >= max(granted) + 0.25
