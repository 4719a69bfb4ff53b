"""Sending one claimed batch: re-check each row, render, send over one connection, record.

SMTP cannot be exactly-once (DESIGN §1). What drip guarantees instead: a row is committed as
`sending` before its message goes out and as `sent` (with its Message-ID) after the server's 250.
If the process dies in between, the row's lease runs out in `sending` and the ticker marks it
`unknown`: never resent automatically. Every change is a conditional UPDATE on the state the row
must still be in, so a second copy of a task (redelivered, or racing) finds nothing to do.

To keep the per-email cost low, the commit that records one message's outcome is the same commit
that marks the next message `sending`: one commit per email.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parseaddr
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from drip import events
from drip.campaigns import Campaign, load_campaign
from drip.clock import Clock
from drip.db import rowcount, transaction
from drip.errors import (
    DripError,
    PermanentDeliveryError,
    TransientDeliveryError,
    UnknownOutcomeError,
)
from drip.messages import build_message, make_message_id
from drip.models import (
    CLAIMED,
    ENDED,
    FAILED,
    PAUSED,
    RETRY,
    SCHEDULED,
    SENDING,
    SENT,
    SKIPPED,
    UNKNOWN,
    Delivery,
    Enrolment,
    Patient,
)
from drip.patients import zone
from drip.rendering import Renderer
from drip.settings import Settings
from drip.transports import Transport
from drip.unsubscribe import unsubscribe_url

log = logging.getLogger("drip.sending")

MAX_ATTEMPTS = 8
BACKOFF_BASE = timedelta(minutes=1)
BACKOFF_CAP = timedelta(hours=2)
GIVE_UP_AFTER_CONSECUTIVE = 2  # transient failures in a row: the server is down, stop the batch
ACTOR = "worker"


def backoff(attempts: int, rng: random.Random) -> timedelta:
    """Exponential back-off with full jitter: uniform in [0, min(cap, base · 2^(attempts-1))]."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(attempts - 1, 0))
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
        self.envelope_from = parseaddr(self.settings.from_address)[1]

    def send_batch(self, ids: list[int]) -> BatchReport:
        report = BatchReport()
        with transaction(self.engine) as session:
            jobs = self._prepare(session, ids, report)
        if jobs:
            self._send_all(jobs, report)
        log.info("batch of %d: %s", len(ids), report.as_dict())
        return report

    # --- before sending -------------------------------------------------------------------

    def _prepare(self, session: Session, ids: list[int], report: BatchReport) -> list[Job]:
        """Re-check every row; settle the ones not to send now; render the rest."""
        now = self.clock.now()
        rows = session.execute(
            select(Delivery, Enrolment, Patient)
            .join(Enrolment, Enrolment.id == Delivery.enrolment_id)
            .join(Patient, Patient.id == Enrolment.patient_id)
            .where(Delivery.id.in_(ids), Delivery.state == CLAIMED)
            .order_by(Delivery.id)
        )
        jobs: list[Job] = []
        campaigns: dict[str, Campaign | DripError] = {}
        seen = 0
        for delivery, enrolment, patient in rows:
            seen += 1
            job = self._check(session, now, delivery, enrolment, patient, campaigns, report)
            if job is not None:
                jobs.append(job)
        report.not_ours += len(set(ids)) - seen
        return jobs

    def _check(
        self,
        session: Session,
        now: datetime,
        delivery: Delivery,
        enrolment: Enrolment,
        patient: Patient,
        campaigns: dict[str, Campaign | DripError],
        report: BatchReport,
    ) -> Job | None:
        settle = _Settle(session, delivery.id, now, report)
        if patient.unsubscribed_at is not None:
            return settle(SKIPPED, "unsubscribed")
        if patient.suppressed_at is not None:
            return settle(SKIPPED, f"suppressed: {patient.suppressed_reason or 'address'}")
        if enrolment.status == ENDED:
            return settle(SKIPPED, "enrolment ended")
        if enrolment.status == PAUSED:
            return settle(SCHEDULED, None, due_at=delivery.due_at)
        local = zone(patient.timezone)
        if not self.settings.send_window.contains(now, local):
            return settle(SCHEDULED, None, due_at=self.settings.send_window.next_open(now, local))
        campaign = self._campaign(enrolment.campaign, campaigns)
        if isinstance(campaign, DripError):
            return settle(FAILED, f"campaign {enrolment.campaign!r}: {campaign}")
        job = Job(delivery.id, delivery.attempts, patient.id, patient.email)
        try:
            self._build(job, campaign, delivery.step_key, patient, now)
        except DripError as e:  # a broken template: fail this row, never send half an email
            return settle(FAILED, f"render: {e}")
        return job

    def _campaign(self, slug: str, cache: dict[str, Campaign | DripError]) -> Campaign | DripError:
        if slug not in cache:
            try:
                cache[slug] = load_campaign(self.settings.templates_dir, slug)
            except DripError as e:
                cache[slug] = e
        return cache[slug]

    def _build(
        self, job: Job, campaign: Campaign, step_key: str, patient: Patient, now: datetime
    ) -> None:
        assert self.renderer is not None
        link = unsubscribe_url(self.settings.public_url, self.settings.secret_key, patient.id)
        rendered = self.renderer.render(
            campaign,
            step_key,
            {
                "first_name": patient.first_name,
                "last_name": patient.last_name or "",
                "unsubscribe_url": link,
            },
        )
        job.message_id = make_message_id(self.settings.from_address)
        job.message = build_message(
            rendered,
            to=patient.email,
            from_address=self.settings.from_address,
            message_id=job.message_id,
            date=now,
            unsubscribe_url=link,
            delivery_id=job.id,
        )

    # --- sending ----------------------------------------------------------------------------

    def _send_all(self, jobs: list[Job], report: BatchReport) -> None:
        outcomes: list[Outcome] = []
        remaining = list(jobs)
        failures_in_a_row = 0
        try:
            while remaining:
                job = remaining.pop(0)
                with self._transaction() as session:
                    self._record(session, outcomes, report)
                    if not self._mark_sending(session, job):
                        report.not_ours += 1
                        continue
                outcome = self._send_one(job)
                outcomes.append(outcome)
                failures_in_a_row = failures_in_a_row + 1 if outcome.state == RETRY else 0
                if failures_in_a_row >= GIVE_UP_AFTER_CONSECUTIVE:
                    break
        finally:
            with self._transaction() as session:
                self._record(session, outcomes, report)
                self._defer(session, remaining, report)

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with transaction(self.engine) as session:
            yield session

    def _mark_sending(self, session: Session, job: Job) -> bool:
        now = self.clock.now()
        result = session.execute(
            update(Delivery)
            .where(Delivery.id == job.id, Delivery.state == CLAIMED)
            .values(
                state=SENDING,
                attempts=Delivery.attempts + 1,
                lease_until=now + timedelta(seconds=self.settings.lease_seconds),
                updated_at=now,
            )
        )
        job.attempts += 1
        return rowcount(result) == 1

    def _send_one(self, job: Job) -> Outcome:
        try:
            self.transport.send(self.envelope_from, job.recipient, job.message)
        except TransientDeliveryError as e:
            return self._transient(job, str(e))
        except PermanentDeliveryError as e:
            return Outcome(job, FAILED, str(e), suppress=e.enhanced if e.bad_mailbox else None)
        except UnknownOutcomeError as e:
            return Outcome(job, UNKNOWN, str(e))
        return Outcome(job, SENT)

    def _transient(self, job: Job, error: str) -> Outcome:
        if job.attempts >= MAX_ATTEMPTS:
            return Outcome(job, FAILED, f"gave up after {job.attempts} attempts: {error}")
        due = self.clock.now() + backoff(job.attempts, self.rng)
        return Outcome(job, RETRY, error, due_at=due)

    # --- recording --------------------------------------------------------------------------

    def _record(self, session: Session, outcomes: list[Outcome], report: BatchReport) -> None:
        now = self.clock.now()
        for outcome in outcomes:
            values: dict[str, Any] = {
                "state": outcome.state,
                "lease_until": None,
                "updated_at": now,
            }
            if outcome.state == SENT:
                values |= {"message_id": outcome.job.message_id, "sent_at": now, "last_error": None}
            else:
                values["last_error"] = (outcome.error or "")[:500]
            if outcome.due_at is not None:
                values["due_at"] = outcome.due_at
            changed = session.execute(
                update(Delivery)
                .where(Delivery.id == outcome.job.id, Delivery.state == SENDING)
                .values(**values)
            )
            if rowcount(changed):
                setattr(report, outcome.state, getattr(report, outcome.state) + 1)
                self._log(session, outcome, now)
        outcomes.clear()

    def _log(self, session: Session, outcome: Outcome, now: datetime) -> None:
        job = outcome.job
        if outcome.state == SENT:
            log.debug("delivery %d sent", job.id)
            return
        log.warning("delivery %d %s: %s", job.id, outcome.state, outcome.error)
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
            session.execute(
                update(Patient)
                .where(Patient.id == job.patient_id, Patient.suppressed_at.is_(None))
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

    def _defer(self, session: Session, jobs: list[Job], report: BatchReport) -> None:
        """Rows not attempted because the mail server is failing: retry them later."""
        if not jobs:
            return
        now = self.clock.now()
        due = now + backoff(1, self.rng) + BACKOFF_BASE
        changed = session.execute(
            update(Delivery)
            .where(Delivery.id.in_([j.id for j in jobs]), Delivery.state == CLAIMED)
            .values(
                state=RETRY,
                due_at=due,
                lease_until=None,
                updated_at=now,
                last_error="not attempted: the mail server was failing",
            )
        )
        report.retry += rowcount(changed)


class _Settle:
    """Settles one claimed row that will not be sent now, with a conditional UPDATE."""

    def __init__(self, session: Session, delivery_id: int, now: datetime, report: BatchReport):
        self.session, self.delivery_id, self.now, self.report = session, delivery_id, now, report

    def __call__(self, state: str, reason: str | None, *, due_at: Any = None) -> None:
        values: dict[str, Any] = {"state": state, "lease_until": None, "updated_at": self.now}
        if state == SCHEDULED:
            values["due_at"] = due_at
        else:
            values["last_error"] = reason
        changed = self.session.execute(
            update(Delivery)
            .where(Delivery.id == self.delivery_id, Delivery.state == CLAIMED)
            .values(**values)
        )
        if not rowcount(changed):
            self.report.not_ours += 1
        elif state == SCHEDULED:
            self.report.deferred += 1
        elif state == SKIPPED:
            self.report.skipped += 1
        else:
            self.report.failed += 1
            log.warning("delivery %d failed before sending: %s", self.delivery_id, reason)
