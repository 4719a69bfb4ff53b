"""The Celery app and its two tasks. Thin: they take ids and hand them to the domain.

- `drip.tick` (sent by beat every DRIP_TICK_SECONDS): Ticker.tick.
- `drip.send_batch` (sent by the tick): Sender.send_batch on a list of delivery ids; then, if
  the send queue is nearly empty, the ticker feeds it (the workers drain faster than one tick
  feeds: see drip.ticker).

Tasks carry delivery ids only, never patient data. Each worker process builds its own engine,
renderer and SMTP connection on first use (after the fork), and reuses them. With
`drip worker --metrics-port`, the Sender and the Ticker count into the exporter's recorder
(drip.metrics), which the pool processes inherit from the main one; else into nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

import redis
from celery import Celery, signals
from kombu.entity import Queue
from sqlalchemy import Engine

from drip import db, logs
from drip.breaker import RedisBreaker, relay_name
from drip.broker import broker, redis_client
from drip.errors import DripError
from drip.ratelimit import Limiter, RedisLimiter, sends_in_last_day
from drip.recorder import NullRecorder, Recorder
from drip.sending import Sender
from drip.settings import Settings
from drip.ticker import LOW_WATER, RedisFeedMemory, Ticker, TickReport, record_heartbeat
from drip.transports import open_transport

if TYPE_CHECKING:
    from drip.metrics import WorkerExporter

log = logging.getLogger("drip.tasks")
SEND_QUEUE = "drip"
TICK_QUEUE = "drip.tick"
VISIBILITY_TIMEOUT = 3600  # seconds; see configure()

app = Celery("drip")


def configure(
    settings: Settings,
    broker_url: str,
    exporter: WorkerExporter | None = None,
    *,
    process: str | None = None,
) -> Celery:
    """Configure the app for one process: broker, serialisation, delivery guarantees, schedule.
    `exporter`: the worker's metrics (drip worker --metrics-port), which its pool inherits;
    `process` (worker or beat) names it in its log lines."""
    app.conf.update(
        broker_url=broker_url,
        broker_connection_retry_on_startup=True,
        # Redis redelivers a message not acknowledged within the visibility timeout. Leases in
        # the database, not redelivery, bring lost work back, so this only needs to be longer
        # than any batch takes; drip never uses ETA/countdown tasks (Redis holds no schedule).
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,  # acknowledged after the batch is recorded…
        task_reject_on_worker_lost=True,  # …and given back if the worker process dies
        worker_prefetch_multiplier=1,  # a worker holds one batch beyond the one it runs
        task_queues=(Queue(SEND_QUEUE), Queue(TICK_QUEUE)),
        task_default_queue=SEND_QUEUE,
        task_routes={"drip.tick": {"queue": TICK_QUEUE}},
        task_time_limit=settings.lease_seconds,
        worker_send_task_events=True,  # Flower sees the workers
        task_send_sent_event=True,
        beat_schedule={
            "drip.tick": {
                "task": "drip.tick",
                "schedule": settings.tick_seconds,
                "options": {"expires": max(settings.tick_seconds * 2, 10)},
            }
        },
        # Ticks are idempotent, so beat needs no memory of past runs: no schedule file, and any
        # number of beats may run anywhere.
        beat_scheduler="celery.beat:Scheduler",
    )
    _configured.update(
        settings=settings, broker_url=broker_url, exporter=exporter, process=process
    )
    return app


_configured: dict[str, Any] = {}


def configure_from_env() -> Celery:
    """For `celery -A worker …`: settings from the environment; with no DRIP_BROKER_URL, the
    private Redis under var/ (started if need be, and stopped when this process exits). It
    connects to nothing else, so `celery -A worker flower` works with the database down; a worker
    or beat started this way checks its clock as it starts (see _check_clock)."""
    settings = Settings.from_env()
    _configured["check_clock"] = True
    stack = ExitStack()
    broker_url = stack.enter_context(broker(settings.broker_url, settings.var_dir))
    atexit.register(stack.close)
    return configure(settings, broker_url)


@signals.worker_init.connect
@signals.beat_init.connect
def _check_clock(**_: Any) -> None:
    """`celery -A worker worker|beat`: refuse a host whose clock is off from the database's, as
    `drip worker` and `drip beat` do before they start Celery."""
    settings = _configured.get("settings")
    if settings is None or not _configured.get("check_clock") or not settings.uses_real_clock:
        return
    engine = db.make_engine(settings.database_url)
    try:
        db.require_clock_in_step(engine)
    except DripError as e:
        log.critical("%s", e)
        raise SystemExit(1) from None
    finally:
        engine.dispose()


@signals.setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Celery's worker and beat (and each pool process) set up logging here: drip's, in
    DRIP_LOG_FORMAT, instead of Celery's own. A receiver of this signal tells Celery to leave
    logging alone, so its own lines (a task received, the worker ready) follow drip's format."""
    settings = _configured.get("settings") or Settings()
    process = _configured.get("process") or ("beat" if "beat" in sys.argv[1:] else "worker")
    logs.configure(settings, process=process, level=loglevel or logging.INFO)


@signals.worker_process_init.connect
def _pool_process_started(**_: Any) -> None:
    if exporter := _configured.get("exporter"):
        exporter.in_pool_process()


@signals.worker_process_shutdown.connect
def _pool_process_gone(pid: int, **_: Any) -> None:
    if exporter := _configured.get("exporter"):
        exporter.process_gone(pid)


@dataclass
class Runtime:
    """What tasks use in one worker process, made on first use after the fork."""

    pid: int
    settings: Settings
    broker_url: str

    @cached_property
    def engine(self) -> Engine:
        return db.make_engine(self.settings.database_url)

    @cached_property
    def sender(self) -> Sender:
        settings = self.settings
        transport = open_transport(settings.mail_url)
        breaker = RedisBreaker(self.redis, relay_name(settings.mail_url))
        log.info(
            "a batch of %d at the slowest send the mail timeout allows (%g s) could take %g s; "
            "it renews its lease and stops taking new emails after %g s",
            settings.batch_size,
            settings.slowest_send_seconds,
            settings.batch_size * settings.slowest_send_seconds,
            settings.soft_deadline_seconds,
        )
        return Sender(
            self.engine,
            settings,
            transport,
            settings.clock(),
            breaker=breaker,
            limiter=self.limiter,
            recorder=self.recorder,
            on_wait=self.recorder.rate_limited,
        )

    @cached_property
    def limiter(self) -> Limiter | None:
        """DRIP_RATE_LIMIT and DRIP_DAILY_LIMIT, shared through Redis; None when neither is set."""
        settings = self.settings
        if settings.rate_limit is None and settings.daily_limit is None:
            return None
        return RedisLimiter(
            self.redis,
            relay_name(settings.mail_url),
            rate=settings.rate_limit,
            daily=settings.daily_limit,
            seed=lambda: sends_in_last_day(self.engine, settings.clock()),
        )

    @cached_property
    def ticker(self) -> Ticker:
        settings = self.settings
        return Ticker(
            self.engine,
            settings,
            settings.clock(),
            _enqueue,
            self.queue_depth,
            self.recorder,
            heartbeat=self.heartbeat,
            memory=RedisFeedMemory(self.redis),
            limiter=self.limiter,
        )

    @cached_property
    def recorder(self) -> Recorder:
        exporter: WorkerExporter | None = _configured.get("exporter")
        return exporter.recorder if exporter else NullRecorder()

    @cached_property
    def redis(self) -> redis.Redis:
        return redis_client(self.broker_url)

    def queue_depth(self) -> int:
        """Batches waiting in the send queue (Celery's Redis transport keeps a queue as a list)."""
        return int(cast(int, self.redis.llen(SEND_QUEUE)))

    def heartbeat(self) -> None:
        """A tick ran: say so where `drip status` and `drip doctor` look (drip.ticker)."""
        record_heartbeat(self.redis, tick_seconds=self.settings.tick_seconds)

    def feed_if_low(self) -> None:
        """After a batch: feed the send queue now if it is nearly empty, rather than at the next
        tick. Never fails the batch's task: the next tick feeds anyway."""
        try:
            if self.queue_depth() <= LOW_WATER:
                report = TickReport()
                self.ticker.feed(report, nudge=True)
                if report.claimed:
                    log.info("fed: %s", report.as_dict())
        except Exception as e:  # Redis or the database: the batch is recorded; ticks go on
            why = type(e).__name__
            log.warning("could not feed the send queue after a batch (%s); the next tick will", why)


_current: list[Runtime] = []


def runtime() -> Runtime:
    """This process's Runtime (a forked child makes its own)."""
    if not _current or _current[0].pid != os.getpid():
        if not _configured:
            configure_from_env()
        _current[:] = [Runtime(os.getpid(), _configured["settings"], _configured["broker_url"])]
    return _current[0]


def _enqueue(ids: list[int]) -> None:
    send_batch.apply_async(args=[ids], queue=SEND_QUEUE)


@app.task(name="drip.tick")
def tick() -> dict[str, int | float | bool]:
    return runtime().ticker.tick().as_dict()


@app.task(name="drip.send_batch")
def send_batch(ids: list[int]) -> dict[str, int]:
    here = runtime()
    report = here.sender.send_batch([int(i) for i in ids])
    here.feed_if_low()
    return report.as_dict()
