"""The send-rate limit and the daily quota, shared by every worker process on every machine.

DRIP_RATE_LIMIT (messages per second) hands out *turns*: each email waits for its own instant,
and two turns are never closer than 1/rate (the generic cell rate algorithm, a token bucket that
holds one token). In any window of W seconds at most ceil(W · rate) turns fall, with no burst
however the workers come and go: an idle limiter saves up nothing. Celery's own `rate_limit` is
per worker process and cannot do this.

DRIP_DAILY_LIMIT is a rolling 24-hour quota, as mail providers count it: every email granted is
counted in its minute (at most 1,441 counters, whatever the volume); a minute counts until its
end is more than 24 hours ago, so the count is never below the true one (a quota frees at most a
minute late) and never more than the limit goes out in any 24 hours.

Both live in Redis and are taken in one Lua script, atomically: there is one schedule, whatever
the number of takers. A take reserves turns at most LOOKAHEAD ahead; one further off is not
reserved (the taker is told how long to wait, and asks again). So every reserved turn lies within
LOOKAHEAD of the moment it was taken, and if Redis loses the schedule (FLUSHALL, a restart) it
starts again *empty*: the first new turn comes after every turn that may still be outstanding.
Starting full would let the new turns overlap the old ones: a burst of up to twice the rate.
The daily count is rebuilt from the database (the rows sent in the last 24 hours) when Redis has
lost it, so a restart of the embedded Redis does not give the relay a fresh day's quota.

The script reads Redis's clock (one clock for every machine); tests pass their own. The keys name
the relay by a hash of its host and port, as the circuit breaker does: no credentials, no
patient data, only counts and instants.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

import redis
from sqlalchemy import Engine, or_, select

from drip.clock import Clock, utcnow
from drip.models import DELIVERIES, SENDING, SENT, UNKNOWN

log = logging.getLogger("drip.ratelimit")

LOOKAHEAD = 1.0  # seconds: how far ahead a take may reserve turns
CHUNK = 0.05  # seconds of turns one take reserves at most (high rates: fewer round trips)
DAY = 86400  # seconds: the quota's rolling window
MINUTE = 60  # seconds: the width of one counter of the daily quota
US = 1_000_000
KEY_TTL = DAY + 2 * MINUTE  # seconds: every key outlives what it counts, then goes by itself


@dataclass(frozen=True)
class Grant:
    """Turns granted by one take: `count` emails, the first `first` seconds from now, then one
    every `interval` seconds. With none granted: `wait` is how long before asking again is worth
    it; `daily_spent` says the quota is used up (then `wait` is until some of it frees)."""

    count: int
    first: float = 0.0
    interval: float = 0.0
    wait: float = 0.0
    daily_spent: bool = False
    unavailable: bool = False  # Redis could not be reached: no turn can be given safely
    minute: int = 0  # the daily counter the turns were counted in (for give_back)
    now: float = 0.0  # the limiter's clock when it granted them (epoch seconds)

    def turns(self) -> list[float]:
        return [self.first + i * self.interval for i in range(self.count)]


@dataclass(frozen=True)
class Quota:
    """What is left of the daily quota: `left` emails (None: no DRIP_DAILY_LIMIT), and in how
    many seconds some of it frees when none is left."""

    left: int | None
    frees_in: float = 0.0


class Limiter(Protocol):
    rate: float | None
    daily: int | None

    def take(self, wanted: int) -> Grant:
        """Up to `wanted` turns (at least one when any is granted)."""

    def give_back(self, minute: int, unused: int) -> None:
        """Turns taken and not used (nothing was sent): back to the daily quota. The rate's
        turns are not given back: a turn missed only slows sending down."""

    def daily_left(self) -> Quota: ...


def interval_us(rate: float) -> int:
    """Microseconds between two turns, rounded up: never faster than `rate`."""
    return math.ceil(US / rate)


def chunk_for(rate: float | None) -> int:
    """How many turns one take asks for: one, or CHUNK seconds' worth at a high rate."""
    return max(1, int(rate * CHUNK)) if rate else 20


# --- in memory: one process (unit tests) ---------------------------------------------------------


@dataclass
class LocalLimiter:
    """The same rules in one process, on an injected clock (seconds)."""

    rate: float | None = None
    daily: int | None = None
    clock: Callable[[], float] = time.time
    tat: int | None = None  # µs: the next free turn
    minutes: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, wanted: int) -> Grant:
        with self._lock:
            now = round(self.clock() * US)
            minute = now // (MINUTE * US)
            if self.daily is not None:
                used = self._prune(now)
                if used >= self.daily:
                    return Grant(0, wait=self._frees_in(now), daily_spent=True, now=now / US)
                wanted = min(wanted, self.daily - used)
            start = now
            if self.rate is not None:
                step = interval_us(self.rate)
                if self.tat is None:  # lost or new: after every turn that may be outstanding
                    self.tat = now + round(LOOKAHEAD * US) + step
                start = max(now, self.tat)
                ahead = start - now - round(LOOKAHEAD * US)
                if ahead > 0:
                    return Grant(0, wait=ahead / US, now=now / US)
                wanted = min(wanted, 1 + (now + round(LOOKAHEAD * US) - start) // step)
                self.tat = start + wanted * step
            if self.daily is not None:
                self.minutes[minute] = self.minutes.get(minute, 0) + wanted
            interval = interval_us(self.rate) / US if self.rate else 0.0
            return Grant(
                wanted, first=(start - now) / US, interval=interval, minute=minute, now=now / US
            )

    def give_back(self, minute: int, unused: int) -> None:
        with self._lock:
            if minute in self.minutes:
                self.minutes[minute] -= min(unused, self.minutes[minute])

    def daily_left(self) -> Quota:
        if self.daily is None:
            return Quota(None)
        with self._lock:
            now = round(self.clock() * US)
            left = max(self.daily - self._prune(now), 0)
            return Quota(left, 0.0 if left else self._frees_in(now))

    def forget(self) -> None:
        """What losing Redis does to the shared one (tests)."""
        self.tat = None

    def _prune(self, now: int) -> int:
        first = (now - DAY * US) // (MINUTE * US)
        for minute in [m for m in self.minutes if m < first]:
            del self.minutes[minute]
        return sum(self.minutes.values())

    def _frees_in(self, now: int) -> float:
        oldest = min((m for m, n in self.minutes.items() if n > 0), default=now // (MINUTE * US))
        return max(((oldest + 1) * MINUTE * US + DAY * US - now) / US, 0.0)


# --- in Redis: every process on every machine -----------------------------------------------------

# Shared by the scripts: the daily counters are a hash of minute -> count, plus `total` and
# `oldest` (the first minute that may still count). Pruning walks forward from `oldest`, so each
# call costs the minutes elapsed since the last one. Numbers are integers (µs, minutes): Redis
# turns a Lua number into an integer reply, and %.0f writes one without an exponent.
_PRUNE = """
local function fmt(x) return string.format('%.0f', x) end
local function clock(arg)
  local now = tonumber(arg)
  if now < 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return now
end
local function prune(key, now, width, day)
  local first = math.floor((now - day) / width)
  local oldest = tonumber(redis.call('HGET', key, 'oldest')) or first
  local total = tonumber(redis.call('HGET', key, 'total')) or 0
  if first - oldest > day / width + 2 then
    redis.call('DEL', key)
    total, oldest = 0, first
  else
    while oldest < first do
      local n = tonumber(redis.call('HGET', key, fmt(oldest)))
      if n then
        total = total - n
        redis.call('HDEL', key, fmt(oldest))
      end
      oldest = oldest + 1
    end
  end
  redis.call('HSET', key, 'oldest', fmt(oldest), 'total', fmt(total))
  return total, oldest
end
local function frees_in(key, now, width, day, oldest)
  local last = math.floor(now / width)
  local m = oldest
  while m < last and (tonumber(redis.call('HGET', key, fmt(m))) or 0) <= 0 do m = m + 1 end
  return math.max((m + 1) * width + day - now, 0)
end
"""

# KEYS: turns, daily. ARGV: wanted, interval µs (0: no rate), daily limit (0: none), lookahead
# µs, minute µs, day µs, ttl ms, now µs (-1: Redis's clock).
# Returns {count, first µs, wait µs, status, minute, now µs}; status 0 granted or later, 1 the
# quota is spent, -1 the daily counters are missing (the caller rebuilds them from the database).
_TAKE = (
    _PRUNE
    + """
local wanted, step, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lookahead, width, day, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]),
  tonumber(ARGV[7])
local now = clock(ARGV[8])
local minute = math.floor(now / width)
if limit > 0 then
  if redis.call('EXISTS', KEYS[2]) == 0 then return {0, 0, 0, -1, 0, now} end
  local used, oldest = prune(KEYS[2], now, width, day)
  minute = math.max(minute, oldest)
  if used >= limit then return {0, 0, frees_in(KEYS[2], now, width, day, oldest), 1, 0, now} end
  wanted = math.min(wanted, limit - used)
end
local start = now
if step > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]))
  if not tat then
    tat = now + lookahead + step  -- lost or new: after every turn that may be outstanding
    redis.call('SET', KEYS[1], fmt(tat), 'PX', ttl)
  end
  start = math.max(now, tat)
  if start - now > lookahead then return {0, 0, start - now - lookahead, 0, 0, now} end
  wanted = math.min(wanted, 1 + math.floor((now + lookahead - start) / step))
  redis.call('SET', KEYS[1], fmt(start + wanted * step), 'PX', ttl)
end
if limit > 0 then
  redis.call('HINCRBY', KEYS[2], fmt(minute), wanted)
  redis.call('HINCRBY', KEYS[2], 'total', wanted)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {wanted, start - now, 0, 0, minute, now}
"""
)

# KEYS: daily. ARGV: limit, minute µs, day µs, now µs. Returns {left, frees_in µs}, or {-1, 0}
# when the counters are missing.
_LEFT = (
    _PRUNE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local limit, width, day = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = clock(ARGV[4])
local used, oldest = prune(KEYS[1], now, width, day)
if used >= limit then return {0, frees_in(KEYS[1], now, width, day, oldest)} end
return {limit - used, 0}
"""
)

# KEYS: daily. ARGV: minute, unused.
_GIVE_BACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local oldest = tonumber(redis.call('HGET', KEYS[1], 'oldest')) or 0
local minute, unused = tonumber(ARGV[1]), tonumber(ARGV[2])
if minute < oldest then return 0 end
local field = string.format('%.0f', minute)
local n = math.min(unused, tonumber(redis.call('HGET', KEYS[1], field)) or 0)
if n <= 0 then return 0 end
redis.call('HINCRBY', KEYS[1], field, -n)
redis.call('HINCRBY', KEYS[1], 'total', -n)
return n
"""

# KEYS: daily. ARGV: ttl ms, first minute, then minute, count pairs. Only if still missing:
# another process may have rebuilt it meanwhile.
_SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local total = 0
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  total = total + tonumber(ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'oldest', ARGV[2], 'total', string.format('%.0f', total))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

Seed = Callable[[], Iterable[float]]  # when (epoch seconds) each email of the last 24 h went out


class RedisLimiter:
    """The limiter shared through Redis. `clock` (epoch seconds) is for tests: by default the
    script reads Redis's own clock. `seed` rebuilds the daily count when Redis has lost it."""

    def __init__(
        self,
        client: redis.Redis,
        relay: str,
        *,
        rate: float | None,
        daily: int | None,
        seed: Seed = lambda: (),
        clock: Callable[[], float] | None = None,
    ) -> None:
        name = hashlib.sha256(relay.encode()).hexdigest()[:16]
        self.client, self.rate, self.daily, self.seed, self.clock = client, rate, daily, seed, clock
        self.turns_key, self.daily_key = f"drip:rate:{name}", f"drip:daily:{name}"
        self._take = client.register_script(_TAKE)
        self._left = client.register_script(_LEFT)
        self._give_back = client.register_script(_GIVE_BACK)
        self._seed = client.register_script(_SEED)

    def take(self, wanted: int) -> Grant:
        step = interval_us(self.rate) if self.rate else 0
        args = [wanted, step, self.daily or 0, round(LOOKAHEAD * US), MINUTE * US, DAY * US]
        try:
            for _ in range(3):
                reply = self._take(
                    keys=[self.turns_key, self.daily_key], args=[*args, KEY_TTL * 1000, self._now()]
                )
                count, first, wait, status, minute, now = (int(x) for x in cast(list[Any], reply))
                if status != -1:
                    break
                self._rebuild()
        except redis.RedisError as e:
            log.warning("rate limit: Redis unreachable (%s); no email goes out without a turn", e)
            return Grant(0, wait=LOOKAHEAD, unavailable=True)
        if status == -1:
            return Grant(0, wait=LOOKAHEAD, unavailable=True)
        if status == 1:
            return Grant(0, wait=wait / US, daily_spent=True, now=now / US)
        return Grant(count, first / US, step / US, wait=wait / US, minute=minute, now=now / US)

    def give_back(self, minute: int, unused: int) -> None:
        if not self.daily or unused <= 0:
            return
        try:
            self._give_back(keys=[self.daily_key], args=[minute, unused])
        except redis.RedisError:
            pass  # the quota stays counted: safe, only less is sent today

    def daily_left(self) -> Quota:
        if not self.daily:
            return Quota(None)
        for _ in range(3):
            reply = self._left(
                keys=[self.daily_key], args=[self.daily, MINUTE * US, DAY * US, self._now()]
            )
            left, frees_in = (int(x) for x in cast(list[Any], reply))
            if left >= 0:
                return Quota(left, frees_in / US)
            self._rebuild()
        return Quota(0, LOOKAHEAD)

    def _now(self) -> int:
        return -1 if self.clock is None else round(self.clock() * US)

    def _rebuild(self) -> None:
        """The daily counters from the database: each email sent in the last 24 hours, in its
        minute, counted afresh (only if no other process got there first)."""
        now = self.clock() if self.clock is not None else _redis_time(self.client)
        counts: dict[int, int] = {}
        for at in self.seed():
            if at > now - DAY:
                minute = int(at * US) // (MINUTE * US)
                counts[minute] = counts.get(minute, 0) + 1
        first = (round(now * US) - DAY * US) // (MINUTE * US)
        pairs = [str(x) for minute, n in sorted(counts.items()) for x in (minute, n)]
        if self._seed(keys=[self.daily_key], args=[KEY_TTL * 1000, first, *pairs]):
            sent = sum(counts.values())
            log.info("daily quota rebuilt from the database: %d emails in the last 24 h", sent)


def _redis_time(client: redis.Redis) -> float:
    seconds, micros = cast(tuple[int, int], client.time())
    return seconds + micros / US


def sends_in_last_day(engine: Engine, clock: Clock) -> list[float]:
    """When each email of the last 24 hours went out, in real epoch seconds: `sent` rows by
    their `sent_at`, and rows `sending` or `unknown` (they may have gone) by their last change.
    The database's instants are the calendar's (DRIP_NOW may shift it), so they are moved back
    by the calendar's offset from the real clock."""
    offset = clock.now() - utcnow()
    since = clock.now() - timedelta(seconds=DAY)
    d = DELIVERIES.c
    query = select(d.sent_at, d.updated_at).where(
        or_(
            (d.state == SENT) & (d.sent_at >= since),
            d.state.in_((SENDING, UNKNOWN)) & (d.updated_at >= since),
        )
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [_epoch((sent or changed) - offset) for sent, changed in rows]


def _epoch(instant: datetime) -> float:
    return instant.timestamp()
