"""Operators' view of deliveries, and `drip retry`: sending again what failed or is unknown.

A retry is an operator's decision (a `delivery.retried` event names who, and the state the row
was in), made in two steps so that `--dry-run` shows exactly what the real run would do: a plan
(the rows that would go, and those that cannot, with why), then the change, through
drip.states. Ids named one by one are all retried or none is; `--state failed|unknown` retries
the rows that can be and lists the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, Select, select
from sqlalchemy.orm import Session

from drip import events, states
from drip.clock import iso
from drip.errors import DripError, InputError
from drip.models import (
    ACTIVE,
    ENDED,
    FAILED,
    UNKNOWN,
    Delivery,
    Enrolment,
    Patient,
)

RETRYABLE = states.RETRYABLE
# Ids are INTEGER columns: 32 bits on PostgreSQL (a DataError past it), and SQLite's never get
# that far (it would raise OverflowError past 64 bits). An id beyond is one no delivery has.
MAX_ID = 2**31 - 1


def list_deliveries(
    session: Session,
    *,
    state: str | None = None,
    patient_id: int | None = None,
    campaign: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The most recently changed deliveries, newest first, optionally only those in `state`,
    of one patient, of one campaign, or changed at or after `since` (ids only: no names or
    addresses)."""
    query = (
        select(Delivery, Enrolment.campaign, Enrolment.patient_id)
        .join(Enrolment, Enrolment.id == Delivery.enrolment_id)
        .order_by(Delivery.updated_at.desc(), Delivery.id.desc())
        .limit(limit)
    )
    if state:
        query = query.where(Delivery.state == state)
    if patient_id is not None:
        query = query.where(Enrolment.patient_id == patient_id)
    if campaign:
        query = query.where(Enrolment.campaign == campaign)
    if since is not None:
        query = query.where(Delivery.updated_at >= since)
    return [
        {
            "id": d.id,
            "patient_id": patient_id,
            "enrolment_id": d.enrolment_id,
            "campaign": campaign,
            "step": d.step_key,
            "state": d.state,
            "due_at": iso(d.due_at),
            "attempts": d.attempts,
            "sent_at": iso(d.sent_at),
            "message_id": d.message_id,
            "last_error": d.last_error,
            "updated_at": iso(d.updated_at),
        }
        for d, campaign, patient_id in session.execute(query)
    ]


# --- drip retry -------------------------------------------------------------------------------

CHUNK = 500  # ids per statement: SQLite allows 32,766 parameters, PostgreSQL 65,535


@dataclass(frozen=True)
class Candidate:
    """A delivery an operator asked to send again (ids and states only)."""

    id: int
    patient_id: int
    campaign: str
    step: str
    state: str
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RetryPlan:
    """What `drip retry` would do: the rows it would send again, and the ones it cannot (each
    with why), or that do not exist."""

    ready: list[Candidate] = field(default_factory=list)
    refused: list[tuple[Candidate, str]] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every bad id, one line each."""
        lines = []
        if self.missing:
            shown = ", ".join(map(str, self.missing))
            lines.append(f"no delivery with id {shown} (see `drip deliveries`)")
        return lines + [f"{c.id}: {why}" for c, why in self.refused]

    def require_all(self) -> None:
        """For ids named one by one: all of them, or nothing (DripError naming each bad id)."""
        if self.missing or self.refused:
            raise DripError(
                "nothing was retried:\n" + "\n".join(f"  {line}" for line in self.problems())
            )


def plan_by_ids(session: Session, ids: list[int], *, now: datetime) -> RetryPlan:
    """The plan for ids named one by one (in the order given, each once)."""
    wanted = list(dict.fromkeys(ids))
    found: dict[int, tuple[Candidate, str | None]] = {}
    for chunk in _chunks([i for i in wanted if 0 < i <= MAX_ID]):
        for row in session.execute(_candidates().where(Delivery.id.in_(chunk))):
            found[row.id] = _judge(row, now)
    plan = RetryPlan(missing=[i for i in wanted if i not in found])
    for delivery_id in wanted:
        if delivery_id in found:
            _add(plan, *found[delivery_id])
    return plan


def plan_by_state(
    session: Session, state: str, *, now: datetime, older_than: timedelta | None = None
) -> RetryPlan:
    """The plan for every delivery in `state` (failed or unknown), optionally only those that
    came to it more than `older_than` ago. Rows that cannot be retried are left out, with why."""
    if state not in (FAILED, UNKNOWN):
        raise InputError("--state", f"{state!r}: give failed or unknown")
    query = _candidates().where(Delivery.state == state).order_by(Delivery.id)
    if older_than is not None:
        query = query.where(Delivery.updated_at < now - older_than)
    plan = RetryPlan()
    for row in session.execute(query):
        _add(plan, *_judge(row, now))
    return plan


def retry(session: Session, plan: RetryPlan, *, now: datetime, actor: str) -> list[int]:
    """Schedule the plan's ready rows to go now; one `delivery.retried` event each, naming the
    actor (an operator's decision) and the state it came from. Returns the ids that changed: a
    `retry` row a ticker claimed meanwhile is left to that claim."""
    changed: list[int] = []
    for chunk in _chunks([c.id for c in plan.ready]):
        statement = states.operator_retry(chunk, now=now).returning(Delivery.id)
        changed += session.scalars(statement)
    done = set(changed)
    events.record_many(
        session,
        [
            events.event_row(
                now, actor, "delivery.retried", c.patient_id, None, c.id, f"was {c.state}"
            )
            for c in plan.ready
            if c.id in done
        ],
    )
    return sorted(done)


def _candidates() -> Select[*tuple[Any, ...]]:
    """What judging a row needs: its state and step's age, its enrolment, its patient's
    opt-outs (no name, no address)."""
    return (
        select(
            Delivery.id,
            Delivery.state,
            Delivery.step_key,
            Delivery.expires_at,
            Delivery.last_error,
            Enrolment.campaign,
            Enrolment.status,
            Enrolment.patient_id,
            Patient.unsubscribed_at,
            Patient.suppressed_at,
        )
        .join(Enrolment, Enrolment.id == Delivery.enrolment_id)
        .join(Patient, Patient.id == Enrolment.patient_id)
    )


def _judge(row: Row[Any], now: datetime) -> tuple[Candidate, str | None]:
    candidate = Candidate(
        row.id, row.patient_id, row.campaign, row.step_key, row.state, row.last_error
    )
    return candidate, _why_not(row, now)


def _add(plan: RetryPlan, candidate: Candidate, why: str | None) -> None:
    if why is None:
        plan.ready.append(candidate)
    else:
        plan.refused.append((candidate, why))


def _why_not(row: Row[Any], now: datetime) -> str | None:
    if row.state not in RETRYABLE:
        return f"is {row.state}; only {', '.join(RETRYABLE)} deliveries can be retried"
    if row.unsubscribed_at or row.suppressed_at:  # first: it ended the enrolment for good
        return "the patient unsubscribed or the address is suppressed"
    if row.status == ENDED:
        return "its enrolment has ended; enrol the patient again to send them anything"
    if row.status != ACTIVE:
        return f"its enrolment is {row.status}; resume it first"
    if row.expires_at is not None and row.expires_at < now:
        return "its step is past its age (its late policy): it would arrive too late to help"
    return None


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]
