"""Sending one claimed batch: re-check each row, render, send over one connection, record.

SMTP cannot be exactly-once (DESIGN §1). What drip guarantees instead: a row is committed as
`sending`, with the Message-ID it will carry, before its message goes out, and as `sent` after
the server's 250. If the process dies in between, the row's lease runs out in `sending` and the
ticker marks it `unknown`: never resent automatically. Every change is a statement of
drip.states, conditional on the state the row must still be in, so a second copy of a task
(redelivered, or racing) finds nothing to do, and a coordinator's pause, unenrol or reschedule
made while the batch runs wins over it (the `claimed → sending` statement re-checks them).

What a batch keeps to, beyond one email:
- a patient never gets two campaign emails closer than DRIP_MIN_GAP: a row that would is moved
  to the gap's end (inside the send window), and skipped if its step is stale by then;
- a step past its age (its late policy, `expires_at`) is skipped, never sent late;
- after one send whose outcome is unknown (a relay that swallows messages), the batch stops,
  gives the rest back and opens the circuit breaker shared by every worker process, so a wedged
  relay costs one `unknown`, not a backlog;
- a relay that cannot be used as configured (RelayConfigError: its TLS certificate, STARTTLS
  missing under tls=required, a password it would get unencrypted) stops the batch the same
  way, the row in hand going back untried too: an operator's mistake costs no row a try;
- transient failures are retried with back-off for DRIP_RETRY_FOR, then `failed`;
- under DRIP_RATE_LIMIT / DRIP_DAILY_LIMIT each email waits for its turn (drip.ratelimit) just
  before it is marked `sending`, keeping the batch's lease; a turn that would come after the
  soft deadline, or a daily quota used up, gives the rows back untried (waiting is never a try);
- a message that cannot be built (any exception) fails its row alone, with the reason;
- the batch renews its lease as it goes and stops taking new emails at its soft deadline, well
  before the hard time limit, giving back what it did not reach.

To keep the per-email cost low (a few hundred microseconds, most of it the SMTP exchange):
- the commit that records one message's outcome is the same commit that marks the next message
  `sending`: one commit per email, on one connection held for the batch, made while the SMTP
  server reads that message's envelope (the transport's `before_content`: no content goes out
  before it returns);
- when every outcome to record is `sent` (the usual case), that commit is driver calls running
  SQL compiled once from drip.states' statements (_EmailCommit; on PostgreSQL, one statement in
  autocommit); any other outcome takes the general path, with Core statements and events;
- the rows are loaded with one Core SELECT, and the messages are rendered and built after that
  transaction has committed, so SQLite's write lock is held only while rows change;
- each message is built while the server is still reading the previous one's body (_Builder,
  the transport's `while_waiting`), so that wait is not idle time.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from drip import events, states, suppression
from drip.breaker import Breaker, LocalBreaker
from drip.campaigns import Campaign, load_campaign
from drip.clock import Clock
from drip.db import begin_immediate
from drip.errors import (
    DeliveryError,
    DripError,
    PermanentDeliveryError,
    RelayConfigError,
    TransientDeliveryError,
)
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
from drip.patients import email_key, zone
from drip.ratelimit import Limiter, chunk_for
from drip.recorder import PERMANENT, RENDER, STALE, TRANSIENT, NullRecorder, Recorder
from drip.recorder import UNKNOWN as UNKNOWN_OUTCOME
from drip.rendering import Renderer
from drip.settings import Settings
from drip.transports import Transport

log = logging.getLogger("drip.sending")

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
    deferred: int = 0  # paused, outside the send window, or too soon after the last email
    given_back: int = 0  # not reached: the relay was failing, or the batch's deadline came
    not_ours: int = 0  # no longer claimed: another copy of the task, or a coordinator's change
    waited_ms: int = 0  # time spent waiting for turns of DRIP_RATE_LIMIT (a metric's counter)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Job:
    """One row on its way out."""

    id: int
    attempts: int
    patient_id: int
    recipient: str
    due_at: datetime
    expires_at: datetime | None
    first_tried_at: datetime | None
    message_id: str | None
    message: bytes = b""


@dataclass
class Outcome:
    """A state change to record for a row now in `sending`."""

    job: Job
    state: str
    error: str | None = None
    due_at: datetime | None = None
    suppress: str | None = None
    cause: str | None = None  # a `failed` row's reason for drip.recorder: permanent, transient…


D, E, P = DELIVERIES.c, ENROLMENTS.c, PATIENTS.c


# Everything a batch needs of a row, in one SELECT of plain columns (no ORM objects). Like every
# statement that finds rows by id and checks their state, the state test must not use the state
# index (see drip.states.unindexed): the ids are looked up by primary key.
_LOAD = (
    select(
        D.id,
        D.attempts,
        D.step_key,
        D.due_at,
        D.expires_at,
        D.first_tried_at,
        D.message_id,
        E.status,
        E.campaign,
        P.id.label("patient_id"),
        P.public_id,
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
    .where(D.id.in_(bindparam("ids", expanding=True)), states.unindexed(D.state) == CLAIMED)
    .order_by(D.due_at, D.id)
)

# When each patient of a batch last got an email (or one may be on its way), for DRIP_MIN_GAP.
_LAST_SENT = (
    select(E.patient_id, func.max(func.coalesce(D.sent_at, D.updated_at)))
    .join(DELIVERIES, D.enrolment_id == E.id)
    .where(
        E.patient_id.in_(bindparam("patients", expanding=True)),
        D.state.in_((SENT, SENDING, UNKNOWN)),
    )
    .group_by(E.patient_id)
)

Loaded = Any  # a Row of _LOAD: attribute access by column name
Hold = tuple[str, str | None, datetime | None]  # (new state, reason, new due time)


@dataclass
class Sender:
    """Sends batches of claimed deliveries. One per worker process; the transport is reused."""

    engine: Engine
    settings: Settings
    transport: Transport
    clock: Clock
    renderer: Renderer | None = None
    rng: random.Random = field(default_factory=random.Random)
    breaker: Breaker = field(default_factory=LocalBreaker)
    monotonic: Callable[[], float] = time.monotonic
    recorder: Recorder = field(default_factory=NullRecorder)
    limiter: Limiter | None = None  # DRIP_RATE_LIMIT, DRIP_DAILY_LIMIT; None: neither is set
    sleep: Callable[[float], None] = time.sleep
    on_wait: Callable[[float], None] = lambda seconds: None  # seconds waited for a turn

    def __post_init__(self) -> None:
        self.renderer = self.renderer or Renderer(self.settings)
        self.envelope_from = envelope_from(self.settings.from_address)
        self.lease = self.settings.lease
        self.keys = self.settings.secret_keys or (self.settings.secret_key,)

    def send_batch(self, ids: list[int]) -> BatchReport:
        report = BatchReport()
        started = self.monotonic()
        with self.engine.begin() as connection:
            now = self.clock.now()
            ready = self._prepare(connection, now, ids, report)
        if ready:
            batch = _Batch(self, _Builder(self, ready, now), started)
            batch.run(report)
        log.info("batch of %d: %s", len(ids), report.as_dict())
        return report

    # --- before sending -------------------------------------------------------------------

    def _prepare(
        self, connection: Connection, now: datetime, ids: list[int], report: BatchReport
    ) -> list[Loaded]:
        """Re-check every row; settle the ones not to send now; return the rest."""
        rows = list(connection.execute(_LOAD, {"ids": ids}))
        report.not_ours += len(set(ids)) - len(rows)
        last = dict(
            connection.execute(_LAST_SENT, {"patients": list({r.patient_id for r in rows})}).all()
        )
        # The list itself, once per batch: the patients' mirror columns are kept with it, but
        # an address suppressed by any path must never be sent to, whatever the mirror says.
        listed = suppression.suppressed_among(connection, self.keys, [r.email for r in rows])
        ready: list[Loaded] = []
        for row in rows:
            entry = listed.get(email_key(row.email))
            hold = self._hold(now, row, last.get(row.patient_id), entry)
            if hold is None:
                ready.append(row)
                last[row.patient_id] = now  # the next one of this patient waits for the gap
            else:
                _settle(connection, row.id, now, report, *hold)
        if ready:  # the batch may have waited in Redis: its lease counts from now
            connection.execute(states.renew([r.id for r in ready], now=now, lease=self.lease))
        return ready

    def _hold(
        self,
        now: datetime,
        row: Loaded,
        last_sent: datetime | None,
        listed: suppression.Entry | None = None,
    ) -> Hold | None:
        """Why a claimed row must not go now: (new state, reason, new due time), or None."""
        if row.unsubscribed_at is not None:
            return SKIPPED, suppression.UNSUBSCRIBED, None
        if row.suppressed_at is not None:
            return SKIPPED, suppression.skip_reason(row.suppressed_reason or "address"), None
        if listed is not None:
            return SKIPPED, suppression.skip_reason(listed.reason), None
        if row.status == ENDED:
            return SKIPPED, "enrolment ended", None
        if row.status == PAUSED:
            return SCHEDULED, None, None
        local = zone(row.timezone)
        earliest = now
        if last_sent is not None and self.settings.min_gap:
            earliest = max(now, last_sent + self.settings.min_gap)
        due = self.settings.send_window.next_open(earliest, local)
        if row.expires_at is not None and due > row.expires_at:
            return SKIPPED, states.STALE_REASON, None
        if due > now:
            return SCHEDULED, None, due
        return None

    def _build(self, job: Job, campaign: Campaign, row: Loaded, now: datetime) -> None:
        assert self.renderer is not None
        recipient = Recipient(
            row.email, row.first_name, row.last_name or "", row.patient_id, row.public_id
        )
        composed = compose(
            self.settings,
            self.renderer,
            campaign,
            row.step_key,
            recipient,
            now=now,
            delivery_id=job.id,
            message_id=job.message_id,  # a row tried before keeps its Message-ID
        )
        job.message_id, job.message = composed.message_id, composed.message

    # --- outcomes ---------------------------------------------------------------------------

    def _failure(self, job: Job, error: DeliveryError) -> Outcome:
        """The outcome of a failed send. A failure that is neither transient nor permanent is
        `unknown`: the message may have arrived, so it is never resent automatically."""
        if isinstance(error, TransientDeliveryError):
            return self._transient(job, str(error))
        if isinstance(error, PermanentDeliveryError):
            suppress = error.enhanced if error.bad_mailbox else None
            return Outcome(job, FAILED, str(error), suppress=suppress, cause=PERMANENT)
        return Outcome(job, UNKNOWN, str(error))

    def _transient(self, job: Job, error: str) -> Outcome:
        """Try again after a back-off, for DRIP_RETRY_FOR from the first try, and never past the
        step's age."""
        now = self.clock.now()
        first = job.first_tried_at or now
        if now - first >= self.settings.retry_for:
            tried_for = _age(now - first)
            why = f"gave up after {job.attempts} tries over {tried_for}: {error}"
            return Outcome(job, FAILED, why, cause=TRANSIENT)
        due = now + backoff(job.attempts, self.rng)
        if job.expires_at is not None and due > job.expires_at:
            return Outcome(job, SKIPPED, f"{states.STALE_REASON}; last try: {error}")
        return Outcome(job, RETRY, error, due_at=due)

    def _record(self, connection: Connection, outcomes: list[Outcome], report: BatchReport) -> None:
        if not outcomes:
            return
        now = self.clock.now()
        for outcome in outcomes:
            if outcome.state == SENT:
                changed = connection.execute(
                    states.RECORD_SENT, {"sent_id": outcome.job.id, "now": now}
                ).rowcount
            else:
                changed = states.leave(
                    connection,
                    [outcome.job.id],
                    SENDING,
                    outcome.state,
                    now=now,
                    error=outcome.error or "",
                    due_at=outcome.due_at,
                )
            if not changed:
                _not_recorded(outcome.job.id, outcome.state)
                continue
            setattr(report, outcome.state, getattr(report, outcome.state) + 1)
            self._count(outcome.state, outcome.cause)
            if outcome.state != SENT:
                self._log(connection, outcome, now)
        outcomes.clear()

    def _log(self, connection: Connection, outcome: Outcome, now: datetime) -> None:
        """A failed, retried, skipped or unknown send: a warning, an event, and a suppression if
        the server said the mailbox is bad. Rare, so a Session (inside this transaction) is
        fine."""
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
        if outcome.suppress:  # the mailbox does not exist: never again, in any campaign
            suppression.add(
                session,
                self.keys,
                job.recipient,
                reason=f"bounce {outcome.suppress}",
                source="bounce",
                now=now,
                actor=ACTOR,
            )

    def _give_back(
        self, connection: Connection, jobs: list[Job], report: BatchReport, stop: Stop
    ) -> None:
        """Rows the batch did not reach. `stop.tried`: the relay was failing, so this counts as
        a try: retried after a back-off, or final once tried for DRIP_RETRY_FOR or past the
        step's age. Else (the batch's deadline came, the circuit breaker opened) they go back
        untried, due at once or when the breaker closes."""
        if not jobs:
            return
        now, why = self.clock.now(), stop.why
        if not stop.tried:
            ids = [job.id for job in jobs]
            due = now + timedelta(seconds=stop.wait) if stop.wait else None
            error = None if stop.untouched else why
            moved = states.leave(
                connection, ids, CLAIMED, SCHEDULED, now=now, error=error, due_at=due
            )
            report.given_back += moved
            if stop.untouched:
                log.warning("%d given back untried, as they were: %s", moved, why)
            return
        due = now + backoff(1, self.rng) + BACKOFF_BASE
        groups: dict[tuple[str, str, datetime | None], list[int]] = {}
        for job in jobs:
            key: tuple[str, str, datetime | None]
            if now - (job.first_tried_at or now) >= self.settings.retry_for:
                key = (FAILED, f"gave up after {job.attempts + 1} tries: {why}", None)
            elif job.expires_at is not None and due > job.expires_at:
                key = (SKIPPED, f"{states.STALE_REASON}; {why}", None)
            else:
                key = (RETRY, why, due)
            groups.setdefault(key, []).append(job.id)
        for (state, error, due_at), ids in groups.items():
            moved = states.leave(
                connection, ids, CLAIMED, state, now=now, error=error, due_at=due_at, tried=True
            )
            name = "given_back" if state == RETRY else state
            setattr(report, name, getattr(report, name) + moved)
            self._count(state, TRANSIENT, moved)

    def _count(self, state: str, cause: str | None, count: int = 1) -> None:
        """Tell the recorder about `count` rows that left `sending` (or were given back after
        a failing relay) for `state`; `cause`: why a `failed` one failed."""
        recorder = self.recorder
        if state == SENT:
            recorder.sent(count)
        elif state == RETRY:
            recorder.retried(count)
        elif state == FAILED:
            recorder.failed(cause or TRANSIENT, count)
        elif state == UNKNOWN:
            recorder.failed(UNKNOWN_OUTCOME, count)
        elif state == SKIPPED:
            recorder.failed(STALE, count)


def _age(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} hours"


def _not_recorded(delivery_id: int, state: str) -> None:
    """The row changed under us between `sending` and its outcome: nothing should ever do that
    (only a lease that ran out mid-send, turned `unknown` by a ticker)."""
    log.warning(
        "delivery %d: its %s outcome was not recorded: the row was no longer `sending` "
        "(its lease ran out mid-send?); see `drip deliveries`",
        delivery_id,
        state,
    )


@dataclass(frozen=True)
class Stop:
    """Why a batch stopped before its end, and how its other rows go back."""

    why: str
    tried: bool = False  # the relay was failing: giving the rows back counts as a try
    wait: float = 0.0  # seconds before they are due again (the breaker's pause)
    untouched: bool = False  # the rows go back as they were: no reason written (daily quota)


BREAKER_CHECK_SECONDS = 1.0  # how often a running batch looks at the shared circuit breaker
WAIT_STEP = 1.0  # seconds: the longest sleep while waiting for a turn (the lease, the breaker)
RECORD_BEFORE_WAIT = 0.1  # seconds: a wait this long first records the email just sent


class _Batch:
    """The sending loop of one batch: one connection, one commit per email, the lease renewed
    as it goes, a soft deadline, and the stops (transient failures in a row, unknown outcome)."""

    def __init__(self, sender: Sender, builder: _Builder, started: float) -> None:
        self.sender, self.builder = sender, builder
        lease = sender.lease.total_seconds()
        self.deadline = started + sender.settings.soft_deadline_seconds
        self.renew_every = lease / 4
        self.renewed = started
        self.breaker_checked = started - BREAKER_CHECK_SECONDS  # looked at before the first email
        self.outcomes: list[Outcome] = []
        self.current: Job | None = None  # taken from the builder, not yet recorded
        self.stop: Stop | None = None
        self.turns: deque[tuple[float, int]] = deque()  # (monotonic instant, minute) taken
        self.turn: int | None = None  # the daily minute of the current email's turn
        self.waited = 0.0

    def run(self, report: BatchReport) -> None:
        sender = self.sender
        with sender.engine.connect() as connection:
            fast = _EmailCommit(connection)
            try:
                self._loop(connection, fast, report)
            finally:
                fast.close()
                self._return_turns(report)
                if connection.in_transaction():  # a failure inside the loop
                    connection.rollback()
                with connection.begin():
                    sender._record(connection, self.outcomes, report)
                    stop = self.stop or Stop("not reached: the batch stopped on an error")
                    # a row in hand whose mark never committed is still `claimed`: back it goes
                    # (leave() moves only rows still claimed, so a row now `sending` stays)
                    in_hand = [self.current] if self.current else []
                    sender._give_back(connection, in_hand + self.builder.unsent(), report, stop)
                    self.builder.settle_broken(connection, report)

    def _loop(self, connection: Connection, fast: _EmailCommit, report: BatchReport) -> None:
        failures_in_a_row = 0
        while self.stop is None:
            self._keep_lease(connection)
            self.stop = self._should_stop()
            if self.stop is not None:
                break
            job = self.current = self.builder.next()
            if job is None:
                break
            self.stop = self._await_turn(connection, report)
            if self.stop is not None:
                break
            mark = _Mark(self._marker(connection, fast, job, report))
            try:
                outcome = self._send_one(job, mark)
            except _NotOurs:
                report.not_ours += 1
                self.current = None
                self._unused_turn()
                continue
            except _RelayUnusable as unusable:
                if unusable.outcome is not None:  # the row went `sending` first: it is retried
                    self.outcomes.append(unusable.outcome)
                    self.current = None
                self.stop = self._relay_unusable(unusable.error)
                break  # a row still in hand was never ours to send: it goes back untried
            self.outcomes.append(outcome)
            self.current = None
            self.turn = None
            failures_in_a_row = failures_in_a_row + 1 if outcome.state == RETRY else 0
            if failures_in_a_row >= GIVE_UP_AFTER_CONSECUTIVE:
                why = f"not attempted: the mail server was failing ({outcome.error})"
                self.stop = Stop(why, tried=True)
            elif outcome.state == UNKNOWN:
                wait = self.sender.breaker.trip()
                why = (
                    "not attempted: the mail server lost an earlier email's outcome "
                    f"({outcome.error}); sending pauses (circuit breaker)"
                )
                self.stop = Stop(why, wait=wait)

    def _relay_unusable(self, error: RelayConfigError) -> Stop:
        """The relay cannot be used as configured (a bad certificate, no STARTTLS under
        tls=required, a password it would get in plain text, credentials refused): no message is
        to blame and every one would meet it. The batch goes back untried and the breaker
        opens, as for a relay that loses outcomes, so it costs no row a try until it is fixed."""
        wait = self.sender.breaker.trip()
        log.error("sending paused: the mail relay cannot be used as configured: %s", error)
        why = f"not attempted: the mail relay cannot be used as configured ({error})"
        return Stop(why, wait=wait)

    def _should_stop(self) -> Stop | None:
        """The batch's soft deadline, or the shared circuit breaker opened by another batch."""
        now_m = self.sender.monotonic()
        if now_m >= self.deadline:
            return Stop("not reached before the batch's deadline; given back untried")
        if now_m - self.breaker_checked >= BREAKER_CHECK_SECONDS:
            self.breaker_checked = now_m
            wait = self.sender.breaker.open_for()
            if wait > 0:
                why = (
                    "not attempted: sending is paused (circuit breaker: a batch lost an email's "
                    "outcome, or could not use the mail relay as configured)"
                )
                return Stop(why, wait=wait)
        return None

    def _await_turn(self, connection: Connection, report: BatchReport) -> Stop | None:
        """DRIP_RATE_LIMIT, DRIP_DAILY_LIMIT: wait for this email's turn, keeping the lease. Or
        stop, the rows given back untried: the daily quota is used up (they go back as they
        were), the turn would come after the batch's soft deadline, or Redis is unreachable."""
        limiter = self.sender.limiter
        if limiter is None:
            return None
        while not self.turns:
            left = 1 + len(self.builder.built) + len(self.builder.rows)
            grant = limiter.take(min(chunk_for(limiter.rate), left))
            if grant.count:
                base = self.sender.monotonic()  # after the reply: a turn is never early
                self.turns.extend((base + at, grant.minute) for at in grant.turns())
            elif grant.daily_spent:
                why = (
                    f"not sent: DRIP_DAILY_LIMIT={limiter.daily} emails in 24 hours reached; "
                    f"some of the quota frees in {grant.wait / 60:.0f} min"
                )
                return Stop(why, untouched=True)
            elif grant.unavailable:
                return Stop("not sent: Redis is unreachable, so DRIP_RATE_LIMIT cannot be kept")
            elif (stop := self._wait(connection, report, self.sender.monotonic() + grant.wait)):
                return stop
        at, self.turn = self.turns.popleft()
        stop = self._wait(connection, report, at)
        if stop is not None:
            self._unused_turn()
        return stop

    def _wait(self, connection: Connection, report: BatchReport, until: float) -> Stop | None:
        """Sleep until `until` (monotonic), renewing the lease and watching the breaker; a Stop
        instead when the batch's soft deadline would come first. Before a wait that is not
        short, the email just sent is recorded `sent` (the fast path would record it with the
        next mark): a worker killed while waiting must not leave it `sending`, then `unknown`."""
        sender = self.sender
        if until >= self.deadline:
            why = "not reached before the batch's deadline (DRIP_RATE_LIMIT); given back untried"
            return Stop(why)
        started = now = sender.monotonic()
        if self.outcomes and until - now >= RECORD_BEFORE_WAIT:
            with connection.begin():
                sender._record(connection, self.outcomes, report)
        try:
            while now < until:
                sender.sleep(min(until - now, WAIT_STEP))
                self._keep_lease(connection)
                if (stop := self._should_stop()) is not None:
                    return stop
                now = sender.monotonic()
        finally:
            if now > started:
                self.waited += now - started
                sender.on_wait(now - started)
        return None

    def _unused_turn(self) -> None:
        """The current email's turn was not used (the row was no longer ours): the daily quota
        gets it back."""
        limiter, turn = self.sender.limiter, self.turn
        self.turn = None
        if limiter is not None and turn is not None:
            limiter.give_back(turn, 1)

    def _return_turns(self, report: BatchReport) -> None:
        """The turns this batch took and did not use go back to the daily quota."""
        report.waited_ms += round(self.waited * 1000)
        limiter = self.sender.limiter
        if limiter is None:
            return
        unused: dict[int, int] = {}
        for _, minute in self.turns:
            unused[minute] = unused.get(minute, 0) + 1
        self.turns.clear()
        for minute, count in unused.items():
            limiter.give_back(minute, count)

    def _keep_lease(self, connection: Connection) -> None:
        """Renew the lease of the rows still to send, every quarter of a lease."""
        now_m = self.sender.monotonic()
        if now_m - self.renewed < self.renew_every:
            return
        self.renewed = now_m
        held = [self.current.id] if self.current is not None else []  # waiting for its turn
        ids = held + [job.id for job in self.builder.unsent()] + [i for i, _ in self.builder.broken]
        if ids:
            sender = self.sender
            with connection.begin():
                connection.execute(states.renew(ids, now=sender.clock.now(), lease=sender.lease))

    def _marker(
        self, connection: Connection, fast: _EmailCommit, job: Job, report: BatchReport
    ) -> Callable[[], bool]:
        """The commit that records the outcomes so far and marks `job` sending: the fast one
        when every outcome is `sent` (the usual case), else the general one (events, logs)."""
        sender, outcomes = self.sender, self.outcomes
        if all(outcome.state == SENT for outcome in outcomes):
            return lambda: self._next_fast(fast, job, report)

        def general() -> bool:
            with connection.begin():
                sender._record(connection, outcomes, report)
                now = sender.clock.now()
                params = _mark_params(job, now, sender.lease)
                marked = connection.execute(states.MARK_SENDING, params).rowcount == 1
            job.attempts += 1
            return marked

        return general

    def _next_fast(self, fast: _EmailCommit, job: Job, report: BatchReport) -> bool:
        """Record the message just sent and mark `job` sending, in one commit."""
        # At most one: each send is preceded by a commit that records (and clears) the outcomes
        # so far, and this path is taken only while all of them are `sent`, one per send.
        outcomes = self.outcomes
        assert len(outcomes) <= 1
        previous = outcomes[0].job.id if outcomes else None
        now = self.sender.clock.now()
        recorded, marked = fast.commit(previous, _mark_params(job, now, self.sender.lease))
        if previous is not None and not recorded:
            _not_recorded(previous, SENT)
        report.sent += recorded
        self.sender.recorder.sent(recorded)
        outcomes.clear()
        job.attempts += 1
        return marked

    def _send_one(self, job: Job, mark: _Mark) -> Outcome:
        """Send one message; `mark` commits the row `sending` before any content goes out (and
        raises _NotOurs if the row is no longer ours). A send that fails before the transport
        called it is marked afterwards, so that every outcome is recorded from `sending`."""
        sender, builder = self.sender, self.builder
        started, building = sender.monotonic(), builder.ahead_seconds
        try:
            sender.transport.send(
                sender.envelope_from,
                job.recipient,
                job.message,
                before_content=mark,
                while_waiting=builder.ahead,
            )
        except RelayConfigError as e:
            if not mark.done:  # the row is still `claimed`: nothing was tried for it
                raise _RelayUnusable(e, None) from e
            mark()
            raise _RelayUnusable(e, sender._failure(job, e)) from e
        except DeliveryError as e:
            self._timed(started, building)
            mark()  # first: _failure reads the attempts that marking counts
            return sender._failure(job, e)
        self._timed(started, building)
        mark()  # a no-op: the transport called it (a transport that did not is not trusted)
        return Outcome(job, SENT)

    def _timed(self, started: float, building: float) -> None:
        """Record one send's time, less the time spent building the next message meanwhile."""
        sender = self.sender
        spent = sender.monotonic() - started - (self.builder.ahead_seconds - building)
        sender.recorder.send_seconds(max(spent, 0.0))


def _mark_params(job: Job, now: datetime, lease: timedelta) -> dict[str, Any]:
    assert job.message_id is not None
    return states.mark_sending_params(job.id, job.due_at, job.message_id, now=now, lease=lease)


class _Builder:
    """Renders and builds a batch's messages one at a time, outside any transaction, one ahead of
    the message being sent when the transport lets it (`ahead`, called while the server reads a
    body). A message that cannot be built, for any reason, fails its row alone (still `claimed`,
    settled with the batch's last commit): never half an email, never a poison batch."""

    def __init__(self, sender: Sender, rows: list[Loaded], now: datetime) -> None:
        self.sender, self.now = sender, now
        self.rows: deque[Loaded] = deque(rows)
        self.built: deque[Job] = deque()
        self.broken: list[tuple[int, str]] = []
        self.campaigns: dict[str, Campaign | DripError] = {}
        self.ahead_seconds = 0.0  # spent in `ahead`, inside sends: not the relay's time

    def next(self) -> Job | None:
        """The next message to send, or None when the batch is done."""
        self._build_one()
        return self.built.popleft() if self.built else None

    def ahead(self) -> None:
        """Build the next message now (never raises: a row that fails is settled as broken)."""
        if not self.built:
            started = self.sender.monotonic()
            self._build_one()
            self.ahead_seconds += self.sender.monotonic() - started

    def unsent(self) -> list[Job]:
        return list(self.built) + [_job(row) for row in self.rows]

    def settle_broken(self, connection: Connection, report: BatchReport) -> None:
        for delivery_id, reason in self.broken:
            if _settle(connection, delivery_id, self.now, report, FAILED, reason):
                self.sender.recorder.failed(RENDER)
        self.broken.clear()

    def _build_one(self) -> None:
        while self.rows and not self.built:
            row = self.rows.popleft()
            job = _job(row)
            campaign = self._campaign(row.campaign)
            if isinstance(campaign, DripError):
                self.broken.append((row.id, f"render: {campaign}"))
                continue
            try:
                self.sender._build(job, campaign, row, self.now)
            except DripError as e:
                self.broken.append((row.id, f"render: {e}"))
                continue
            except Exception as e:  # a bug or a broken file: this row fails, the batch goes on
                log.exception("delivery %d could not be built", row.id)
                self.broken.append((row.id, f"render: {type(e).__name__}: {e}"))
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


def _job(row: Loaded) -> Job:
    return Job(
        row.id,
        row.attempts,
        row.patient_id,
        row.email,
        row.due_at,
        row.expires_at,
        row.first_tried_at,
        row.message_id,
    )


class _NotOurs(Exception):
    """The row is no longer `claimed` with its plan, or its enrolment is no longer active: a
    coordinator's change, or another copy of the task, got there first."""


class _RelayUnusable(Exception):
    """The transport raised RelayConfigError: the batch stops; `outcome` is the row's when it
    had already gone `sending` (a 530 to MAIL), else None (it goes back with the rest)."""

    def __init__(self, error: RelayConfigError, outcome: Outcome | None) -> None:
        super().__init__(str(error))
        self.error, self.outcome = error, outcome


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

    drip.states' RECORD_SENT (the row just accepted by the server `sending` → `sent`) and
    MARK_SENDING (the next row `claimed` → `sending`, with its checks), compiled once for this
    database and run as driver calls. Through SQLAlchemy's execution they cost about 150 µs of
    Python per email, and on SQLite the write lock is held meanwhile. The connection is idle as
    far as SQLAlchemy knows (no transaction of its own is open), and every path ends in commit or
    rollback.

    On PostgreSQL both are one statement (two data-modifying CTEs) run in autocommit mode: the
    server runs it as a transaction of its own, so the commit is one round trip instead of four
    (BEGIN, two UPDATEs, COMMIT), which halves its time.
    """

    INSTANTS = ("now", "lease_until", "planned_due")

    def __init__(self, connection: Connection) -> None:
        dialect = connection.dialect
        raw: Any = connection.connection.driver_connection
        self.raw, self.cursor = raw, raw.cursor()
        self.sqlite = dialect.name == "sqlite"
        if self.sqlite:
            named = sqlite.dialect(paramstyle="named")  # sqlite3 takes :name with a dict
            self.mark = states.MARK_SENDING.compile(dialect=named)
            self.sent = states.RECORD_SENT.compile(dialect=named)
            # the statements' own constants (state names…), bound once: per email, only ours
            self.mark_base, self.sent_base = dict(self.mark.params), dict(self.sent.params)
        else:
            both = select(
                select(func.count())
                .select_from(states.RECORD_SENT.returning(D.id).cte("sent"))
                .scalar_subquery(),
                select(func.count())
                .select_from(states.MARK_SENDING.returning(D.id).cte("marked"))
                .scalar_subquery(),
            )
            self.both = both.compile(dialect=dialect)
            self.both_base = dict(self.both.params)
        process = D.updated_at.type.dialect_impl(dialect).bind_processor(dialect)
        self.instant: Callable[[datetime], Any] = process or (lambda value: value)

    def commit(self, previous: int | None, mark: dict[str, Any]) -> tuple[int, bool]:
        """Record `previous`, the id of the message sent since the last commit if any, and mark
        a row sending (MARK_SENDING's parameters): (rows recorded `sent`, whether the row
        marked is now ours)."""
        params = {k: self.instant(v) if k in self.INSTANTS else v for k, v in mark.items()}
        if self.sqlite:
            recorded, marked = self._sqlite(previous, params)
        else:
            recorded, marked = self._postgresql(previous, params)
        if previous is not None:
            log.debug("delivery %d sent", previous)
        return recorded, marked

    def close(self) -> None:
        self.cursor.close()

    def _sqlite(self, previous: int | None, params: dict[str, Any]) -> tuple[int, bool]:
        cursor, recorded = self.cursor, 0
        try:
            begin_immediate(self.raw)  # the write lock, waited for in short steps
            if previous is not None:
                sent = self.sent_base | {"sent_id": previous, "now": params["now"]}
                cursor.execute(self.sent.string, sent)
                recorded = cursor.rowcount
            cursor.execute(self.mark.string, self.mark_base | params)
            marked = cursor.rowcount == 1
            self.raw.commit()
        except BaseException:
            self.raw.rollback()
            raise
        return recorded, marked

    def _postgresql(self, previous: int | None, params: dict[str, Any]) -> tuple[int, bool]:
        values = self.both_base | params | {"sent_id": previous}
        self.raw.autocommit = True  # the statement is a transaction of its own
        try:
            self.cursor.execute(self.both.string, values, prepare=True)
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
) -> bool:
    """Settle one claimed row that will not be sent now (see Sender._hold), and count it;
    False if it was no longer ours."""
    if not states.leave(
        connection, [delivery_id], CLAIMED, state, now=now, error=reason, due_at=due_at
    ):
        report.not_ours += 1
        return False
    if state == SCHEDULED:
        report.deferred += 1
    elif state == SKIPPED:
        report.skipped += 1
    else:
        report.failed += 1
        log.warning("delivery %d failed before sending: %s", delivery_id, reason)
    return True
