"""Prometheus metrics: the database's figures for `drip serve`'s /metrics, and a worker's own
series for `drip worker --metrics-port`. Every name starts with `drip_`; every label value comes
from a fixed set (delivery states, enrolment statuses, drip.recorder's failure reasons), never a
patient's data or a server's reply.

The database's figures (`DatabaseCollector`) are read when Prometheus scrapes, in one read-only
transaction, so every process serving /metrics gives the same answer and nothing runs between
scrapes: deliveries by state (a GROUP BY walking ix_deliveries_state_due_at), the rows due now
and the oldest one's lag (the same rows a ticker would claim: waiting, due, of an active
enrolment), enrolments by status, and suppressed addresses. When the database cannot be read the
scrape still answers, with `drip_database_up 0` and none of the figures (a zero would read as
"nothing is due"): the exporters' convention (`pg_up`, `mysql_up`), which keeps "drip serve is
down" (Prometheus' own `up`) apart from "the database is down".

A worker's series (`WorkerExporter`) use prometheus-client's multiprocess mode, since Celery's
prefork pool sends from several processes: each writes its counts to memory-mapped files in a
folder of its own under var/ (owner-only, emptied when the worker starts), and the worker's main
process serves their sum over HTTP. The sending and ticking code see only drip.recorder's
interface, implemented here by PrometheusRecorder.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import Connection, Engine, bindparam, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from drip.clock import Clock
from drip.errors import DripError
from drip.models import (
    ACTIVE,
    DELIVERIES,
    ENROLMENT_STATUSES,
    ENROLMENTS,
    STATES,
    SUPPRESSIONS,
    WAITING_STATES,
)
from drip.permissions import private_folder
from drip.recorder import FAILURE_REASONS, check_reason

log = logging.getLogger("drip.metrics")
D, E = DELIVERIES.c, ENROLMENTS.c

# --- the database's figures --------------------------------------------------------------------

# One pass over the (state, due_at) index: the table's rows are not read (see docs/performance.md).
_BY_STATE = select(D.state, func.count()).group_by(D.state)
# PostgreSQL prices that index-only scan a little above a sequential scan of the whole table,
# which reads five times the pages and takes nearly twice as long at a million rows: for this
# one statement, the index is the only way it may take. SQLite walks the covering index itself.
_INDEX_ONLY = text("SET LOCAL enable_seqscan = off")
_ANY_WAY = text("SET LOCAL enable_seqscan = on")
# What a ticker would claim now: waiting, due, and of an active enrolment (a paused patient's
# overdue emails are not late, they wait on purpose). A range of the same index per state, each
# row's enrolment looked up by primary key: the claim's own shape (see drip.claims.claim_due).
_ENROLMENT = select(E.status).where(E.id == D.enrolment_id).scalar_subquery()
_DUE = select(func.count(), func.min(D.due_at)).where(
    D.state.in_(WAITING_STATES), D.due_at <= bindparam("now"), _ENROLMENT == ACTIVE
)
_BY_STATUS = select(E.status, func.count()).group_by(E.status)
_SUPPRESSED = select(func.count()).select_from(SUPPRESSIONS)


@dataclass(frozen=True)
class Figures:
    """What the database says, at one instant."""

    deliveries: dict[str, int]  # every delivery state → rows in it
    due_now: int
    oldest_due_seconds: float  # 0 when nothing is due
    enrolments: dict[str, int]  # every enrolment status → enrolments in it
    suppressed: int


def read_figures(connection: Connection, now: datetime) -> Figures:
    """The figures, read in `connection`'s transaction."""
    postgresql = connection.dialect.name == "postgresql"
    if postgresql:
        connection.execute(_INDEX_ONLY)
    by_state = {state: int(n) for state, n in connection.execute(_BY_STATE)}
    if postgresql:
        connection.execute(_ANY_WAY)
    count, oldest = connection.execute(_DUE, {"now": now}).one()
    by_status = {status: int(n) for status, n in connection.execute(_BY_STATUS)}
    suppressed = connection.scalar(_SUPPRESSED)
    return Figures(
        deliveries={state: int(by_state.get(state, 0)) for state in STATES},
        due_now=int(count or 0),
        oldest_due_seconds=max((now - oldest).total_seconds(), 0.0) if oldest else 0.0,
        enrolments={status: int(by_status.get(status, 0)) for status in ENROLMENT_STATUSES},
        suppressed=int(suppressed or 0),
    )


def families(figures: Figures) -> Iterator[Metric]:
    """The figures as Prometheus gauges."""
    deliveries = GaugeMetricFamily(
        "drip_deliveries", "Deliveries (planned emails) in each state.", labels=["state"]
    )
    for state, count in figures.deliveries.items():
        deliveries.add_metric([state], count)
    yield deliveries
    yield GaugeMetricFamily(
        "drip_due_now",
        "Deliveries due and not yet claimed (scheduled or retry, of an active enrolment).",
        value=figures.due_now,
    )
    yield GaugeMetricFamily(
        "drip_oldest_due_seconds",
        "How long the oldest delivery due and not yet claimed has waited (0: none is due).",
        value=figures.oldest_due_seconds,
    )
    enrolments = GaugeMetricFamily(
        "drip_enrolments", "Enrolments in each status.", labels=["status"]
    )
    for status, count in figures.enrolments.items():
        enrolments.add_metric([status], count)
    yield enrolments
    yield GaugeMetricFamily(
        "drip_suppressed", "Addresses on the suppression list.", value=figures.suppressed
    )


class DatabaseCollector:
    """The database's figures, read at each scrape (a prometheus-client custom collector).

    `engine` should be a reader (drip.db.make_reader): a scrape takes no write lock and gives up
    within seconds. When the database cannot be read, the scrape answers `drip_database_up 0`
    alone, and the reason is logged once, when it starts (and once when it ends)."""

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self.engine, self.clock = engine, clock
        self._down: str | None = None
        self._lock = threading.Lock()  # gunicorn may run threads: the flags above are shared

    def collect(self) -> Iterator[Metric]:
        try:
            figures = self.read()
        except SQLAlchemyError as e:
            self._went_down(e)
            yield _up(0)
            return
        self._came_back()
        yield from families(figures)
        yield _up(1)

    def read(self) -> Figures:
        with self.engine.connect() as connection, connection.begin():
            return read_figures(connection, self.clock.now())

    def _went_down(self, error: SQLAlchemyError) -> None:
        reason = _reason(error)
        with self._lock:
            changed, self._down = self._down != reason, reason
        if changed:
            log.warning("metrics: the database cannot be read (drip_database_up 0): %s", reason)

    def _came_back(self) -> None:
        with self._lock:
            was, self._down = self._down, None
        if was is not None:
            log.warning("metrics: the database can be read again (drip_database_up 1)")


def _up(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "drip_database_up",
        "1 if this scrape read the database, 0 if it could not (the figures are then absent).",
        value=value,
    )


def _reason(error: SQLAlchemyError) -> str:
    """The driver's first line, without the statement or its parameters (SQLAlchemy appends
    both to its own message)."""
    orig = getattr(error, "orig", None) or error
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0] if lines else ''}"[:300]


def database_registry(engine: Engine, clock: Clock) -> CollectorRegistry:
    """A registry of the database's figures alone (no process or platform series: every name
    /metrics shows starts with `drip_`)."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(engine, clock))
    return registry


# --- a worker's own series ---------------------------------------------------------------------

# A local relay answers in about a millisecond; a remote one (SES, Postmark) in 50-500 ms; a
# slow or failing one runs into DRIP_MAIL_URL's timeout (30 s by default).
SEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A tick is a few statements; a slow one (a large claim, a busy database) takes seconds.
TICK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class PrometheusRecorder:
    """drip.recorder's interface over prometheus-client metrics, registered nowhere: in
    multiprocess mode every process writes its own files, and the exporter reads them all."""

    def __init__(self) -> None:
        self._sent = Counter("drip_sent", "Emails the mail server accepted.", registry=None)
        failed = Counter(
            "drip_failed",
            "Emails that will not go by themselves, by reason: permanent (5xx), transient "
            "(temporary failures past DRIP_RETRY_FOR), unknown (outcome not known), render "
            "(could not be built), stale (a retry would come past the step's age).",
            ["reason"],
            registry=None,
        )
        # every reason exists from the start, at 0: rate() needs a series before its first rise
        self._failed = {reason: failed.labels(reason) for reason in FAILURE_REASONS}
        self._retried = Counter(
            "drip_retried",
            "Emails put back to be tried later (a temporary failure).",
            registry=None,
        )
        self._send = Histogram(
            "drip_send_seconds", "Time of one SMTP send.", buckets=SEND_BUCKETS, registry=None
        )
        self._tick = Histogram(
            "drip_tick_seconds", "Time of one tick.", buckets=TICK_BUCKETS, registry=None
        )
        self._limited = Counter(
            "drip_rate_limited_seconds",
            "Seconds workers waited for the global send-rate limit (DRIP_RATE_LIMIT).",
            registry=None,
        )
        # every series, e.g. to register in a registry of one's own (in a single process)
        self.metrics = (self._sent, failed, self._retried, self._send, self._tick, self._limited)

    def sent(self, count: int = 1) -> None:
        if count:
            self._sent.inc(count)

    def failed(self, reason: str, count: int = 1) -> None:
        if count:
            self._failed[check_reason(reason)].inc(count)

    def retried(self, count: int = 1) -> None:
        if count:
            self._retried.inc(count)

    def send_seconds(self, seconds: float) -> None:
        self._send.observe(seconds)

    def tick_seconds(self, seconds: float) -> None:
        self._tick.observe(seconds)

    def rate_limited(self, seconds: float) -> None:
        if seconds > 0:
            self._limited.inc(seconds)


@dataclass
class WorkerExporter:
    """A worker's series over HTTP, summed over its pool processes' files in `folder`."""

    folder: Path
    address: tuple[str, int]
    server: WSGIServer
    thread: threading.Thread
    recorder: PrometheusRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.recorder = PrometheusRecorder()

    def in_pool_process(self) -> None:
        """In a pool process, just forked: it serves nothing, so it closes its copy of the
        listening socket (else a pool process left behind would keep the port)."""
        self.server.socket.close()

    def process_gone(self, pid: int) -> None:
        """A pool process exited: prometheus-client's bookkeeping (its counts stay summed)."""
        multiprocess.mark_process_dead(pid, str(self.folder))  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class PoolCollector:
    """The sum of every process's files in `folder` (prometheus-client's MultiProcessCollector,
    less a race): a process that counts for the first time creates its file empty and only then
    sizes it, and a scrape that opened it in between failed whole (mmap of an empty file, a 500).
    A file still empty holds nothing yet, so it is left for the next scrape."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterable[Metric]:
        files = [str(f) for f in sorted(self.folder.glob("*.db")) if _size(f) > 0]
        merged: Iterable[Metric] = multiprocess.MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
        return merged


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # emptied meanwhile (a worker starting)
        return 0


def metrics_folder(var_dir: Path, port: int) -> Path:
    """Where a worker's processes write their series: one folder per port, and a port is one
    worker's on a machine, so a worker starting never empties a running one's."""
    return (var_dir / "metrics" / f"worker-{port}").resolve()


def start_worker_exporter(var_dir: Path, host: str, port: int) -> WorkerExporter:
    """Serve this worker's series on host:port, in a thread of this (the main) process; call
    before the pool is forked. The port is taken first: a DripError naming the fix if it is in
    use, before anything is emptied."""
    registry = CollectorRegistry()
    server, thread = _serve(registry, host, port)
    folder = metrics_folder(var_dir, port)
    shutil.rmtree(folder, ignore_errors=True)  # a run's counts start at 0 (Prometheus expects it)
    private_folder(folder)
    # prometheus-client chooses between in-memory and file-backed values from this variable,
    # when it is first imported; set here, and the choice made again, so that the metrics this
    # process and its pool processes (which inherit both) create from now on write to `folder`.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    registry.register(PoolCollector(folder))
    return WorkerExporter(folder, (host, port), server, thread)


def check_listen(host: str, port: int) -> None:
    """Raise the DripError start_worker_exporter would, now (`drip run`, before its worker)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            probe.bind((host, port))
    except OSError as e:
        raise _listen_error(e, host, port) from None


def _serve(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, Any]:
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise _listen_error(e, host, port) from None


def _listen_error(error: OSError, host: str, port: int) -> DripError:
    """What a failure to listen on host:port means, and the fix."""
    where = f"--metrics-host {host} --metrics-port {port}"
    if isinstance(error, socket.gaierror):
        return DripError(
            f"{where}: {host!r} is not a host name or address of this machine; use one, e.g. "
            "127.0.0.1 (the default)"
        )
    if error.errno == errno.EADDRINUSE:
        return DripError(
            f"{where}: the port is already in use (another drip worker on this machine?); "
            "give each worker its own --metrics-port, or stop what listens there "
            f"(see `ss -ltnp 'sport = :{port}'`)"
        )
    if error.errno == errno.EACCES:
        return DripError(f"{where}: ports below 1024 need root; use a higher one, e.g. 9464")
    if error.errno == errno.EADDRNOTAVAIL:
        return DripError(
            f"{where}: {host} is not an address of this machine; use one of its own, e.g. "
            "127.0.0.1 (the default) or 0.0.0.0 (every interface)"
        )
    return DripError(f"{where}: cannot listen there: {error.strerror or error}")
