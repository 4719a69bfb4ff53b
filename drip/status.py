"""`drip status`: what the pipeline is doing now, at a glance.

The figures about emails come from the database, the source of truth: deliveries by state, the
rows due and not yet claimed, how late the oldest of them is, what was sent and what failed in
the last hour. The figures about work in hand come from Redis: batches waiting in the queues, the
workers that answer a ping, when a tick last ran (drip.ticker's heartbeat). Redis may be down
while the database is not: the database's figures are still shown, and Redis's are unknown
(None, `null` in JSON), never zero. Nothing here waits more than about a second for Redis.

What each query costs at a million rows (timings and plans in docs/performance.md):
- by state: one GROUP BY, the one query that reads every row (an exact count; counters kept on
  the hot path would cost every send a second write): 0.15-0.4 s;
- due now and the oldest lag: the range `state IN (scheduled, retry) AND due_at <= now` of
  ix_deliveries_state_due_at, each candidate's enrolment by primary key (the claim's own shape):
  it grows with the backlog, not the table;
- sent in the last hour: the range `sent_at >= now - 1h` of ix_deliveries_sent_at;
- failed in the last hour: the `failed` rows of the state index, filtered by when they changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from drip import db
from drip.broker import EmbeddedRedis, redis_client
from drip.clock import iso, utcnow
from drip.errors import DripError
from drip.models import (
    ACTIVE,
    DELIVERIES,
    ENROLMENTS,
    FAILED,
    STATES,
    UNKNOWN,
    WAITING_STATES,
)
from drip.settings import Settings
from drip.ticker import HEARTBEAT_KEY, Heartbeat, parse_heartbeat
from drip.urls import redact

D, E = DELIVERIES.c, ENROLMENTS.c
LAST_HOUR = timedelta(hours=1)
REDIS_TIMEOUT = 1.0  # seconds a Redis connect or reply may take before it counts as unreachable
PING_TIMEOUT = 1.0  # seconds workers have to answer the ping (a ping always waits this long)
SEND_QUEUE, TICK_QUEUE = "drip", "drip.tick"  # drip.tasks' queues (not imported: no Celery app)
LAGGING = timedelta(minutes=5)  # an oldest due row later than this is shown as a warning


# --- the database ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Deliveries:
    """The database's figures."""

    by_state: dict[str, int]
    due_now: int
    oldest_due_seconds: float | None
    sent_last_hour: int
    failed_last_hour: int


def deliveries(session: Session, *, now: datetime) -> Deliveries:
    due, oldest = _due(session, now)
    return Deliveries(
        by_state=_by_state(session),
        due_now=due,
        oldest_due_seconds=None if oldest is None else (now - oldest).total_seconds(),
        sent_last_hour=_count(session, D.sent_at >= now - LAST_HOUR),
        failed_last_hour=_count(session, D.state == FAILED, D.updated_at >= now - LAST_HOUR),
    )


def _by_state(session: Session) -> dict[str, int]:
    counted = session.execute(select(D.state, func.count()).group_by(D.state))
    return dict.fromkeys(STATES, 0) | {state: int(n) for state, n in counted}


def _due(session: Session, now: datetime) -> tuple[int, datetime | None]:
    """Rows a ticker would claim now: waiting, due, of an active enrolment (a paused one's rows
    are held on purpose, not late). The enrolment is a scalar subquery, as in the claim itself,
    so no statistics can turn this into a join over every row."""
    enrolment = select(E.status).where(E.id == D.enrolment_id).scalar_subquery()
    count, oldest = session.execute(
        select(func.count(), func.min(D.due_at)).where(
            D.state.in_(WAITING_STATES), D.due_at <= now, enrolment == ACTIVE
        )
    ).one()
    return int(count), oldest


def _count(session: Session, *where: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(DELIVERIES).where(*where)) or 0)


# --- Redis ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisView:
    """What Redis says; or, with `error`, why it cannot say, and `fix`."""

    shown: str  # where, as messages may show it (no password)
    error: str | None = None  # "unreachable", "not running"…
    fix: str | None = None
    detail: str | None = None  # the client's own words
    queues: dict[str, int] | None = None
    workers: list[str] | None = None
    heartbeat: Heartbeat | None = None
    checked_at: datetime = field(default_factory=utcnow)  # real time, as heartbeats are
    private: bool = False  # drip's private Redis under var/, not DRIP_BROKER_URL

    @property
    def reachable(self) -> bool:
        return self.error is None

    @property
    def problem(self) -> str | None:
        """`Redis unreachable at redis://host:6379/0 (connection refused)`, or None."""
        if self.error is None:
            return None
        where = f"{self.shown} (drip's private Redis)" if self.private else self.shown
        return f"Redis {self.error} at {where}" + (f" ({self.detail})" if self.detail else "")

    @property
    def queue_depth(self) -> int | None:
        """Batches of ids waiting for a worker (each up to DRIP_BATCH_SIZE emails)."""
        return None if self.queues is None else self.queues[SEND_QUEUE]

    @property
    def ticker_late(self) -> bool | None:
        if not self.reachable:
            return None
        return self.heartbeat is None or self.heartbeat.late(self.checked_at)


def broker_in_use(settings: Settings) -> tuple[str | None, str]:
    """(URL, shown): DRIP_BROKER_URL, or the private Redis under var/ if it is running (it is
    never started here: a status with nothing running should say so, not start something)."""
    if settings.broker_url:
        return settings.broker_url, redact(settings.broker_url)
    embedded = EmbeddedRedis(settings.var_dir)
    return (embedded.url if embedded.alive() else None), embedded.url


NOT_RUNNING_FIX = (
    "the private Redis runs only while `drip run` or `drip worker` does: start drip, or set "
    "DRIP_BROKER_URL to the Redis your workers use"
)
UNREACHABLE_FIX = "start Redis there, or set DRIP_BROKER_URL to the Redis your workers use"


def redis_view(
    settings: Settings, *, timeout: float = REDIS_TIMEOUT, ping_timeout: float = PING_TIMEOUT
) -> RedisView:
    url, shown = broker_in_use(settings)
    private = settings.broker_url is None
    if url is None:
        return RedisView(shown, "not running", NOT_RUNNING_FIX, private=True)
    client = redis_client(url, timeout=timeout)
    try:
        with client.pipeline(transaction=False) as pipe:
            for queue in (SEND_QUEUE, TICK_QUEUE):
                pipe.llen(queue)
            pipe.get(HEARTBEAT_KEY)
            send, tick, raw = pipe.execute()
    except redis.AuthenticationError:
        fix = "check the password in DRIP_BROKER_URL"
        return RedisView(shown, "refused the password", fix, private=private)
    except redis.RedisError as e:
        return RedisView(shown, "unreachable", UNREACHABLE_FIX, _reason(e), private=private)
    finally:
        client.close()
    return RedisView(
        shown,
        private=private,
        queues={SEND_QUEUE: int(send), TICK_QUEUE: int(tick)},
        workers=live_workers(url, ping_timeout),
        heartbeat=parse_heartbeat(raw),
    )


def _reason(error: Exception) -> str:
    return str(error).strip().rstrip(".") or type(error).__name__


def live_workers(broker_url: str, timeout: float = PING_TIMEOUT) -> list[str] | None:
    """The node names of the workers that answer a Celery ping within `timeout` (None if the
    ping could not be sent). Its own short-lived app: it must not retry a broker for ever."""
    from celery import Celery
    from kombu.exceptions import KombuError

    app = Celery("drip-status", broker=broker_url, set_as_current=False)
    app.conf.update(
        broker_connection_retry=False,
        broker_connection_max_retries=0,
        broker_connection_timeout=timeout,
        broker_transport_options={"socket_timeout": timeout, "socket_connect_timeout": timeout},
    )
    try:
        replies = app.control.ping(timeout=timeout) or []
    except (KombuError, redis.RedisError, OSError):
        return None
    finally:
        app.close()
    return sorted(name for reply in replies for name in reply)


# --- together -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    at: datetime  # the calendar's now (DRIP_NOW, or the real time)
    deliveries: Deliveries
    redis: RedisView

    def as_json(self) -> dict[str, Any]:
        """DESIGN §5's keys (deliveries, due_now, oldest_due_seconds, workers, queue_depth), and
        more; what Redis holds is null when Redis cannot be reached."""
        d, r, beat = self.deliveries, self.redis, self.redis.heartbeat
        return {
            "at": iso(self.at),
            "deliveries": d.by_state,
            "due_now": d.due_now,
            "oldest_due_seconds": _rounded(d.oldest_due_seconds),
            "sent_last_hour": d.sent_last_hour,
            "failed_last_hour": d.failed_last_hour,
            "workers": r.workers,
            "queue_depth": r.queue_depth,
            "queues": r.queues,
            "ticker_last_run": iso(beat.at) if beat else None,
            "ticker_seconds_ago": _rounded(beat.age(r.checked_at).total_seconds())
            if beat
            else None,
            "ticker_late": r.ticker_late,
            "redis": {
                "url": r.shown,
                "private": r.private,
                "reachable": r.reachable,
                "error": r.problem,
                "fix": r.fix,
            },
        }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def gather(settings: Settings, engine: Engine, *, now: datetime) -> Status:
    """The database's figures (a DripError naming the fix if it cannot be read), then Redis's."""
    db.require_current_schema(engine)
    try:
        with db.transaction(engine) as session:
            figures = deliveries(session, now=now)
    except OperationalError as e:
        raise DripError(
            f"cannot read the database at {db.shown_url(engine)}: {e.orig}; start the database "
            "server, or correct DRIP_DATABASE_URL"
        ) from None
    return Status(now, figures, redis_view(settings))


# --- for people -----------------------------------------------------------------------------

BAD, WARN, GOOD = "bold red", "yellow", "green"


def view(status: Status) -> Table:
    """Status as a two-column table; colours show on a terminal only (output.console)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in _lines(status):
        grid.add_row(label, value)
    return grid


def _lines(status: Status) -> list[tuple[str, Text]]:
    d, r = status.deliveries, status.redis
    lines = [
        ("at", Text(f"{status.at:%Y-%m-%d %H:%M:%S} UTC")),
        ("deliveries", _states(d.by_state)),
        ("due now", _due_text(d)),
        ("last hour", _last_hour(d)),
    ]
    if not r.reachable:
        return [*lines, ("Redis", Text(f"{r.problem} — {r.fix}", style=BAD))]
    return [
        *lines,
        ("workers", _workers(r.workers)),
        ("queue", _queue(r)),
        ("ticker", _ticker(r)),
        ("Redis", Text(r.shown)),
    ]


def _states(by_state: dict[str, int]) -> Text:
    text = Text()
    for i, (state, n) in enumerate(by_state.items()):
        style = BAD if state == FAILED and n else WARN if state == UNKNOWN and n else ""
        text.append(" · " if i else "")
        text.append(f"{state} {n:,}", style=style)
    return text


def _due_text(d: Deliveries) -> Text:
    if not d.due_now or d.oldest_due_seconds is None:
        return Text("0")
    late = timedelta(seconds=d.oldest_due_seconds)
    return Text(
        f"{d.due_now:,}, the oldest {ago(late)} overdue", style=WARN if late > LAGGING else ""
    )


def _last_hour(d: Deliveries) -> Text:
    text = Text(f"{d.sent_last_hour:,} sent · ")
    text.append(f"{d.failed_last_hour:,} failed", style=BAD if d.failed_last_hour else "")
    return text


def _workers(workers: list[str] | None) -> Text:
    if workers is None:
        return Text("unknown: the ping could not be sent", style=WARN)
    if not workers:
        return Text("none answered: start `drip worker` (or `drip run`)", style=BAD)
    return Text(f"{len(workers)} alive: {', '.join(workers)}", style=GOOD)


def _queue(r: RedisView) -> Text:
    assert r.queues is not None
    send, tick = r.queues[SEND_QUEUE], r.queues[TICK_QUEUE]
    return Text(f"{send:,} batch{'es' if send != 1 else ''} waiting, {tick:,} tick(s)")


def _ticker(r: RedisView) -> Text:
    beat = r.heartbeat
    if beat is None:
        return Text("no tick has run since Redis started: start `drip beat`", style=BAD)
    said = f"ran {ago(beat.age(r.checked_at))} ago on {beat.host} (every {beat.tick_seconds:g} s)"
    if r.ticker_late:
        return Text(f"{said}: late; is `drip beat` running, are the workers stuck?", style=BAD)
    return Text(said, style=GOOD)


def ago(delta: timedelta) -> str:
    """A duration as people say it: 4 s, 2 min 14 s, 3 h 5 min, 2 d 4 h."""
    seconds = int(delta.total_seconds())
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"
