"""Sending one claimed batch: re-check each row, render, send over one connection, record.

SMTP cannot be exactly-once (DESIGN §1). What drip guarantees instead: a row is committed as
`sending` before its message goes out and as `sent` (with its Message-ID) after the server's 250.
If the process dies in between, the row's lease runs out in `sending` and the ticker marks it
`unknown`: never resent automatically. Every change is a conditional UPDATE on the state the row
must still be in, so a second copy of a task (redelivered, or racing) finds nothing to do.

To keep the per-email cost low (a few hundred microseconds, most of it the SMTP exchange):

- the commit that records one message's outcome is the same commit that marks the next message
  `sending`: one commit per email, on one connection held for the batch, made while the SMTP
  server reads that message's envelope (the transport's `before_content`: no content goes out
  before it returns);
- when every outcome to record is `sent` (the usual case), that commit is driver calls with SQL
  written once (_EmailCommit; on PostgreSQL, one statement in autocommit): no ORM UPDATE path
  (which builds, coerces and evaluates the statement against the identity map every time) and
  no SQLAlchemy execution in between, which also keeps SQLite's write lock short; any other
  outcome takes the general path, with Core statements and events;
- the rows are loaded with one Core SELECT of the columns needed, and the messages are rendered
  and built after that transaction has committed, so SQLite's write lock is held only while rows
  change;
- each message is built while the server is still reading the previous one's body (_Builder,
  the transport's `while_waiting`), so that wait is not idle time.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select, update
from sqlalchemy.orm import Session

from drip import events
from drip.campaigns import Campaign, load_campaign
from drip.claims import leave, unindexed
from drip.clock import Clock
from drip.db import begin_immediate
from drip.errors import DeliveryError, DripError, PermanentDeliveryError, TransientDeliveryError
from drip.messages import Recipient, compose, envelope_from
from drip.models import (
    CLAIMED,
    DELIVERIES,
    ENDED,
    ENROLMENTS,
    FAILED,
    PATIENTS,
    PAUSED,
    RETRY,
    SCHEDULED,
    SENDING,
    SENT,
    SKIPPED,
    UNKNOWN,
)
from drip.patients import zone
from drip.rendering import Renderer
from drip.settings import Settings
from drip.transports import Transport

log = logging.getLogger("drip.sending")

MAX_ATTEMPTS = 8
BACKOFF_BASE = timedelta(minutes=1)
BACKOFF_CAP = timedelta(hours=2)
GIVE_UP_AFTER_CONSECUTIVE = 2  # transient failures in a row: the server is down, stop the batch
ACTOR = "worker"


def backoff(attempts: int, rng: random.Random) -> timedelta:
    """Exponential back-off with full jitter: uniform in [0, min(cap, base · 2^(attempts-1))]."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (1 << min(max(attempts - 1, 0), 30)))
    return ceiling * rng.random()


@dataclass
class BatchReport:
    """What one batch did, by outcome."""

    sent: int = 0
    retry: int = 0
    failed: int = 0
    unknown: int = 0
    skipped: int = 0
    deferred: int = 0  # paused, or outside the send window: back to scheduled
    not_ours: int = 0  # no longer claimed (another copy of the task got there first)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Job:
    """One row on its way out."""

    id: int
    attempts: int
    patient_id: int
    recipient: str
    message: bytes = b""
    message_id: str = ""


@dataclass
class Outcome:
    """A state change to record for a row now in `sending`."""

    job: Job
    state: str
    error: str | None = None
    due_at: datetime | None = None
    suppress: str | None = None


D, E, P = DELIVERIES.c, ENROLMENTS.c, PATIENTS.c


# Everything a batch needs of a row, in one SELECT of plain columns (no ORM objects). Like every
# statement here that finds rows by id and checks their state, the state test must not use the
# state index (see drip.claims.unindexed): the ids are looked up by primary key.
_STATE = unindexed(D.state)
_LOAD = (
    select(
        D.id,
        D.attempts,
        D.step_key,
        D.due_at,
        E.status,
        E.campaign,
        P.id.label("patient_id"),
        P.email,
        P.first_name,
        P.last_name,
        P.timezone,
        P.unsubscribed_at,
        P.suppressed_at,
        P.suppressed_reason,
    )
    .join(ENROLMENTS, E.id == D.enrolment_id)
    .join(PATIENTS, P.id == E.patient_id)
    .where(D.id.in_(bindparam("ids", expanding=True)), _STATE == CLAIMED)
    .order_by(D.id)
)

Loaded = Any  # a Row of _LOAD: attribute access by column name

# The two statements of the per-email commit, built once (compiled-cache hits from then on).
_MARK_SENDING = (
    update(DELIVERIES)
    .where(D.id == bindparam("b_id"), _STATE == CLAIMED)
    .values(
        state=SENDING,
        attempts=D.attempts + 1,
        lease_until=bindparam("b_lease_until"),
        updated_at=bindparam("b_now"),
    )
)
_RECORD_SENT = (
    update(DELIVERIES)
    .where(D.id == bindparam("b_id"), _STATE == SENDING)
    .values(
        state=SENT,
        lease_until=None,
        updated_at=bindparam("b_now"),
        message_id=bindparam("b_message_id"),
        sent_at=bindparam("b_now"),
        last_error=None,
    )
)


@dataclass
class Sender:
    """Sends batches of claimed deliveries. One per worker process; the transport is reused."""

    engine: Engine
    settings: Settings
    transport: Transport
    clock: Clock
    renderer: Renderer | None = None
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.renderer = self.renderer or Renderer(self.settings)
        self.envelope_from = envelope_from(self.settings.from_address)
        self.lease = self.settings.lease

    def send_batch(self, ids: list[int]) -> BatchReport:
        report = BatchReport()
        with self.engine.begin() as connection:
            now = self.clock.now()
            ready = self._prepare(connection, now, ids, report)
        if ready:
            self._send_all(_Builder(self, ready, now), report)
        log.info("batch of %d: %s", len(ids), report.as_dict())
        return report

    # --- before sending -------------------------------------------------------------------

    def _prepare(
        self, connection: Connection, now: datetime, ids: list[int], report: BatchReport
    ) -> list[Loaded]:
        """Re-check every row; settle the ones not to send now; return the rest."""
        ready: list[Loaded] = []
        seen = 0
        for row in connection.execute(_LOAD, {"ids": ids}):
            seen += 1
            hold = self._hold(now, row)
            if hold is None:
                ready.append(row)
            else:
                _settle(connection, row.id, now, report, *hold)
        report.not_ours += len(set(ids)) - seen
        return ready

    def _hold(self, now: datetime, row: Loaded) -> tuple[str, str | None, datetime | None] | None:
        """Why a claimed row must not go now: (new state, reason, new due time), or None."""
        if row.unsubscribed_at is not None:
            return SKIPPED, "unsubscribed", None
        if row.suppressed_at is not None:
            return SKIPPED, f"suppressed: {row.suppressed_reason or 'address'}", None
        if row.status == ENDED:
            return SKIPPED, "enrolment ended", None
        if row.status == PAUSED:
            return SCHEDULED, None, row.due_at
        local = zone(row.timezone)
        if not self.settings.send_window.contains(now, local):
            return SCHEDULED, None, self.settings.send_window.next_open(now, local)
        return None

    def _build(self, job: Job, campaign: Campaign, row: Loaded, now: datetime) -> None:
        assert self.renderer is not None
        recipient = Recipient(row.email, row.first_name, row.last_name or "", row.patient_id)
        composed = compose(
            self.settings,
            self.renderer,
            campaign,
            row.step_key,
            recipient,
            now=now,
            delivery_id=job.id,
        )
        job.message_id, job.message = composed.message_id, composed.message

    # --- sending ----------------------------------------------------------------------------

    def _send_all(self, builder: _Builder, report: BatchReport) -> None:
        """Send the batch's messages in order. Each row is committed `sending` while the server
        reads the message's envelope (the transport's `before_content`), and each message is
        built while the server reads the one before it (after its body, before its reply)."""
        outcomes: list[Outcome] = []
        failures_in_a_row = 0
        with self.engine.connect() as connection:
            fast = _EmailCommit(connection)
            try:
                while (job := builder.next()) is not None:
                    mark = _Mark(self._marker(connection, fast, outcomes, job, report))
                    try:
                        outcome = self._send_one(job, mark, builder.ahead)
                    except _NotOurs:
                        report.not_ours += 1
                        continue
                    outcomes.append(outcome)
                    failures_in_a_row = failures_in_a_row + 1 if outcome.state == RETRY else 0
                    if failures_in_a_row >= GIVE_UP_AFTER_CONSECUTIVE:
                        break
            finally:
                fast.close()
                if connection.in_transaction():  # a failure inside the block above
                    connection.rollback()
                with connection.begin():
                    self._record(connection, outcomes, report)
                    self._defer(connection, builder.unsent(), report)
                    builder.settle_broken(connection, report)

    def _marker(
        self,
        connection: Connection,
        fast: _EmailCommit,
        outcomes: list[Outcome],
        job: Job,
        report: BatchReport,
    ) -> Callable[[], bool]:
        """The commit that records the outcomes so far and marks `job` sending: the fast one
        when every outcome is `sent` (the usual case), else the general one (events, logs)."""
        if all(outcome.state == SENT for outcome in outcomes):
            return lambda: self._next_fast(fast, outcomes, job, report)

        def general() -> bool:
            with connection.begin():
                self._record(connection, outcomes, report)
                return self._mark_sending(connection, job)

        return general

    def _next_fast(
        self, fast: _EmailCommit, outcomes: list[Outcome], job: Job, report: BatchReport
    ) -> bool:
        """Record the messages just sent and mark `job` sending, in one commit: the same two
        conditional UPDATEs as _record and _mark_sending, without SQLAlchemy in between."""
        # At most one: each send is preceded by a commit that records (and clears) the outcomes
        # so far, and this path is taken only while all of them are `sent`, one per send.
        assert len(outcomes) <= 1
        previous = (outcomes[0].job.id, outcomes[0].job.message_id) if outcomes else None
        now = self.clock.now()
        recorded, marked = fast.commit(previous, job.id, now, now + self.lease)
        report.sent += recorded
        outcomes.clear()
        job.attempts += 1
        return marked

    def _mark_sending(self, connection: Connection, job: Job) -> bool:
        now = self.clock.now()
        result = connection.execute(
            _MARK_SENDING, {"b_id": job.id, "b_lease_until": now + self.lease, "b_now": now}
        )
        job.attempts += 1
        return result.rowcount == 1

    def _send_one(
        self, job: Job, mark: _Mark, while_waiting: Callable[[], None] | None = None
    ) -> Outcome:
        """Send one message; `mark` commits the row `sending` before any content goes out (and
        raises _NotOurs if the row is no longer ours). A send that fails before the transport
        called it is marked afterwards, so that every outcome is recorded from `sending`."""
        try:
            self.transport.send(
                self.envelope_from,
                job.recipient,
                job.message,
                before_content=mark,
                while_waiting=while_waiting,
            )
        except DeliveryError as e:
            mark()  # first: _failure reads the attempts that marking counts
            return self._failure(job, e)
        mark()  # a no-op: the transport called it (a transport that did not is not trusted)
        return Outcome(job, SENT)

    def _failure(self, job: Job, error: DeliveryError) -> Outcome:
        """The outcome of a failed send. A failure that is neither transient nor permanent is
        `unknown`: the message may have arrived, so it is never resent automatically."""
        if isinstance(error, TransientDeliveryError):
            return self._transient(job, str(error))
        if isinstance(error, PermanentDeliveryError):
            suppress = error.enhanced if error.bad_mailbox else None
            return Outcome(job, FAILED, str(error), suppress=suppress)
        return Outcome(job, UNKNOWN, str(error))

    def _transient(self, job: Job, error: str) -> Outcome:
        if job.attempts >= MAX_ATTEMPTS:
            return Outcome(job, FAILED, f"gave up after {job.attempts} attempts: {error}")
        due = self.clock.now() + backoff(job.attempts, self.rng)
        return Outcome(job, RETRY, error, due_at=due)

    # --- recording --------------------------------------------------------------------------

    def _record(self, connection: Connection, outcomes: list[Outcome], report: BatchReport) -> None:
        if not outcomes:
            return
        now = self.clock.now()
        for outcome in outcomes:
            if outcome.state == SENT:
                changed = connection.execute(
                    _RECORD_SENT,
                    {"b_id": outcome.job.id, "b_now": now, "b_message_id": outcome.job.message_id},
                ).rowcount
            else:
                changed = leave(
                    connection,
                    [outcome.job.id],
                    SENDING,
                    now=now,
                    state=outcome.state,
                    error=outcome.error or "",
                    due_at=outcome.due_at,
                )
            if changed:
                setattr(report, outcome.state, getattr(report, outcome.state) + 1)
                if outcome.state == SENT:
                    log.debug("delivery %d sent", outcome.job.id)
                else:
                    self._log(connection, outcome, now)
        outcomes.clear()

    def _log(self, connection: Connection, outcome: Outcome, now: datetime) -> None:
        """A failed, retried or unknown send: a warning, an event, and a suppression if the
        server said the mailbox is bad. Rare, so a Session (inside this transaction) is fine."""
        job = outcome.job
        log.warning("delivery %d %s: %s", job.id, outcome.state, outcome.error)
        session = Session(bind=connection)  # joins the transaction in progress
        events.record(
            session,
            at=now,
            actor=ACTOR,
            kind=f"delivery.{outcome.state}",
            patient_id=job.patient_id,
            delivery_id=job.id,
            detail=outcome.error,
        )
        if outcome.suppress:
            connection.execute(
                update(PATIENTS)
                .where(P.id == job.patient_id, P.suppressed_at.is_(None))
                .values(suppressed_at=now, suppressed_reason=f"bounce {outcome.suppress}")
            )
            events.record(
                session,
                at=now,
                actor=ACTOR,
                kind="patient.suppressed",
                patient_id=job.patient_id,
                delivery_id=job.id,
                detail=outcome.suppress,
            )

    def _defer(self, connection: Connection, ids: list[int], report: BatchReport) -> None:
        """Rows not attempted because the mail server is failing: retry them later."""
        if not ids:
            return
        now = self.clock.now()
        report.retry += leave(
            connection,
            ids,
            CLAIMED,
            now=now,
            state=RETRY,
            error="not attempted: the mail server was failing",
            due_at=now + backoff(1, self.rng) + BACKOFF_BASE,
        )


class _Builder:
    """Renders and builds a batch's messages one at a time, outside any transaction, one ahead of
    the message being sent when the transport lets it (`ahead`, called while the server reads a
    body). A broken campaign or template fails its row (still `claimed`, settled with the batch's
    last commit): never half an email."""

    def __init__(self, sender: Sender, rows: list[Loaded], now: datetime) -> None:
        self.sender, self.now = sender, now
        self.rows: deque[Loaded] = deque(rows)
        self.built: deque[Job] = deque()
        self.broken: list[tuple[int, str]] = []
        self.campaigns: dict[str, Campaign | DripError] = {}
        self.error: Exception | None = None

    def next(self) -> Job | None:
        """The next message to send, or None when the batch is done."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        self._build_one()
        return self.built.popleft() if self.built else None

    def ahead(self) -> None:
        """Build the next message now; never raises (an error is raised by next())."""
        if self.built or self.error is not None:
            return
        try:
            self._build_one()
        except Exception as e:
            self.error = e

    def unsent(self) -> list[int]:
        return [job.id for job in self.built] + [row.id for row in self.rows]

    def settle_broken(self, connection: Connection, report: BatchReport) -> None:
        for delivery_id, reason in self.broken:
            _settle(connection, delivery_id, self.now, report, FAILED, reason)
        self.broken.clear()

    def _build_one(self) -> None:
        while self.rows and not self.built:
            row = self.rows.popleft()
            job = Job(row.id, row.attempts, row.patient_id, row.email)
            campaign = self._campaign(row.campaign)
            if isinstance(campaign, DripError):
                self.broken.append((row.id, f"render: {campaign}"))
                continue
            try:
                self.sender._build(job, campaign, row, self.now)
            except DripError as e:
                self.broken.append((row.id, f"render: {e}"))
                continue
            self.built.append(job)

    def _campaign(self, slug: str) -> Campaign | DripError:
        """The batch's campaigns, each loaded once; a broken one is kept as its error, which
        fails each of its rows."""
        if slug not in self.campaigns:
            try:
                self.campaigns[slug] = load_campaign(self.sender.settings.templates_dir, slug)
            except DripError as e:
                self.campaigns[slug] = e
        return self.campaigns[slug]


class _NotOurs(Exception):
    """The row is no longer `claimed` by this task (another copy of it got there first)."""


class _Mark:
    """The commit that makes a row ours to send (`claimed` → `sending`), run once."""

    __slots__ = ("commit", "done")

    def __init__(self, commit: Callable[[], bool]) -> None:
        self.commit, self.done = commit, False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        if not self.commit():
            raise _NotOurs


class _EmailCommit:
    """The commit made once per email on the hot path, on the driver's own connection.

    Two conditional UPDATEs: the rows just accepted by the server `sending` → `sent`, the next
    row `claimed` → `sending`. Through SQLAlchemy they cost about 150 µs of Python per email, and
    on SQLite the write lock is held meanwhile, so two worker processes keep running into it
    (and SQLite's busy handler then sleeps for a whole millisecond). Here they are driver calls
    with the SQL written once: the same statements, the same conditions, the values bound by the
    columns' own SQLAlchemy types. The connection is idle as far as SQLAlchemy knows (no
    transaction of its own is open), and every path ends in commit or rollback.

    On PostgreSQL both UPDATEs are one statement (two data-modifying CTEs) run in autocommit
    mode: the server runs it as a transaction of its own, so the commit is one round trip
    instead of four (BEGIN, two UPDATEs, COMMIT), which halves its time.
    """

    def __init__(self, connection: Connection) -> None:
        dialect = connection.dialect
        raw: Any = connection.connection.driver_connection
        self.raw, self.cursor = raw, raw.cursor()
        self.sqlite = dialect.name == "sqlite"
        style = ":{}" if self.sqlite else "%({})s"  # sqlite3 named / psycopg pyformat
        table = DELIVERIES.name

        def mark(id_: str) -> str:
            return (
                f"UPDATE {table} SET state = '{SENDING}', attempts = attempts + 1, "
                f"lease_until = {style.format('lease_until')}, updated_at = {style.format('now')} "
                f"WHERE id = {style.format(id_)} AND state || '' = '{CLAIMED}'"
            )

        def sent(id_: str) -> str:
            return (
                f"UPDATE {table} SET state = '{SENT}', lease_until = NULL, "
                f"updated_at = {style.format('now')}, message_id = {style.format('message_id')}, "
                f"sent_at = {style.format('now')}, last_error = NULL "
                f"WHERE id = {style.format(id_)} AND state || '' = '{SENDING}'"
            )

        self.mark_sql, self.sent_sql = mark("id"), sent("id")
        self.both_sql = (
            f"WITH sent AS ({sent('sent_id')} RETURNING id), "
            f"marked AS ({mark('mark_id')} RETURNING id) "
            "SELECT (SELECT count(*) FROM sent), (SELECT count(*) FROM marked)"
        )
        process = D.updated_at.type.dialect_impl(dialect).bind_processor(dialect)
        self.instant: Callable[[datetime], Any] = process or (lambda value: value)

    def commit(
        self, previous: tuple[int, str] | None, mark: int, now: datetime, lease_until: datetime
    ) -> tuple[int, bool]:
        """Record `previous` (id, Message-ID), the message sent since the last commit if any, and
        mark row `mark` sending: (rows recorded `sent`, whether `mark` is now ours)."""
        at, until = self.instant(now), self.instant(lease_until)
        if self.sqlite:
            recorded, marked = self._sqlite(previous, mark, at, until)
        else:
            recorded, marked = self._postgresql(previous, mark, at, until)
        if previous is not None:
            log.debug("delivery %d sent", previous[0])
        return recorded, marked

    def close(self) -> None:
        self.cursor.close()

    def _sqlite(
        self, previous: tuple[int, str] | None, mark: int, at: Any, until: Any
    ) -> tuple[int, bool]:
        cursor, recorded = self.cursor, 0
        try:
            begin_immediate(self.raw)  # the write lock, waited for in short steps
            if previous is not None:
                delivery_id, message_id = previous
                cursor.execute(
                    self.sent_sql, {"id": delivery_id, "now": at, "message_id": message_id}
                )
                recorded = cursor.rowcount
            cursor.execute(self.mark_sql, {"id": mark, "now": at, "lease_until": until})
            marked = cursor.rowcount == 1
            self.raw.commit()
        except BaseException:
            self.raw.rollback()
            raise
        return recorded, marked

    def _postgresql(
        self, previous: tuple[int, str] | None, mark: int, at: Any, until: Any
    ) -> tuple[int, bool]:
        sent_id, message_id = previous or (None, None)  # no id: the first CTE changes nothing
        params = {"sent_id": sent_id, "message_id": message_id, "mark_id": mark}
        self.raw.autocommit = True  # the statement is a transaction of its own
        try:
            self.cursor.execute(
                self.both_sql, {**params, "now": at, "lease_until": until}, prepare=True
            )
            recorded, marked = self.cursor.fetchone()
        finally:
            self.raw.autocommit = False
        return recorded, marked == 1


def _settle(
    connection: Connection,
    delivery_id: int,
    now: datetime,
    report: BatchReport,
    state: str,
    reason: str | None,
    due_at: datetime | None = None,
) -> None:
    """Settle one claimed row that will not be sent now (see Sender._hold), and count it."""
    if not leave(
        connection, [delivery_id], CLAIMED, now=now, state=state, error=reason, due_at=due_at
    ):
        report.not_ours += 1
    elif state == SCHEDULED:
        report.deferred += 1
    elif state == SKIPPED:
        report.skipped += 1
    else:
        report.failed += 1
        log.warning("delivery %d failed before sending: %s", delivery_id, reason)
