"""Operators' view of deliveries, and `drip retry`: sending again what failed or is unknown."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drip import events, states
from drip.clock import iso
from drip.errors import DripError, NotFound
from drip.models import (
    ACTIVE,
    Delivery,
    Enrolment,
    Patient,
)

RETRYABLE = states.RETRYABLE
# Ids are INTEGER columns: 32 bits on PostgreSQL (a DataError past it), and SQLite's never get
# that far (it would raise OverflowError past 64 bits). An id beyond is one no delivery has.
MAX_ID = 2**31 - 1


def list_deliveries(
    session: Session, *, state: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """The most recently changed deliveries (ids only: no names or addresses)."""
    query = (
        select(Delivery, Enrolment.campaign, Enrolment.patient_id)
        .join(Enrolment, Enrolment.id == Delivery.enrolment_id)
        .order_by(Delivery.updated_at.desc(), Delivery.id.desc())
        .limit(limit)
    )
    if state:
        query = query.where(Delivery.state == state)
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
        }
        for d, campaign, patient_id in session.execute(query)
    ]


def retry(session: Session, ids: list[int], *, now: datetime, actor: str) -> int:
    """Schedule the given deliveries to go now. All or nothing: any id that cannot be retried
    is an error naming it and why, and nothing changes."""
    rows = session.execute(
        select(Delivery, Enrolment, Patient)
        .join(Enrolment, Enrolment.id == Delivery.enrolment_id)
        .join(Patient, Patient.id == Enrolment.patient_id)
        .where(Delivery.id.in_([i for i in ids if 0 < i <= MAX_ID]))
    )
    found = {d.id: (d, e, p) for d, e, p in rows}
    missing = sorted(set(ids) - set(found))
    if missing:
        raise NotFound(f"no delivery with id {', '.join(map(str, missing))}; see `drip deliveries`")
    problems = [f"  {i}: {why}" for i in ids if (why := _why_not(*found[i], now))]
    if problems:
        raise DripError("nothing was retried:\n" + "\n".join(problems))
    session.execute(states.operator_retry(ids, now=now))
    for delivery_id in ids:
        events.record(
            session,
            at=now,
            actor=actor,
            kind="delivery.retried",
            patient_id=found[delivery_id][2].id,
            delivery_id=delivery_id,
        )
    return len(ids)


def _why_not(
    delivery: Delivery, enrolment: Enrolment, patient: Patient, now: datetime
) -> str | None:
    if delivery.state not in RETRYABLE:
        return f"is {delivery.state}; only {', '.join(RETRYABLE)} deliveries can be retried"
    if enrolment.status != ACTIVE:
        return f"its enrolment is {enrolment.status}; resume it first"
    if patient.unsubscribed_at or patient.suppressed_at:
        return "the patient unsubscribed or the address is suppressed"
    if delivery.expires_at is not None and delivery.expires_at < now:
        return "its step is past its age (its late policy): it would arrive too late to help"
    return None
