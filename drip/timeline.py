"""A patient's timeline: every planned email, when it is due in UTC and in their own zone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drip.campaigns import Campaign
from drip.clock import iso
from drip.models import SCHEDULED, Delivery, Enrolment, Patient
from drip.patients import zone


@dataclass(frozen=True)
class Entry:
    """One planned email as a coordinator sees it."""

    delivery_id: int
    enrolment_id: int
    campaign: str
    enrolment_status: str
    step: str
    state: str
    due_at: datetime | None
    local_time: datetime | None
    attempts: int
    sent_at: datetime | None
    note: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id,
            "enrolment_id": self.enrolment_id,
            "campaign": self.campaign,
            "enrolment_status": self.enrolment_status,
            "step": self.step,
            "state": self.state,
            "due_at": iso(self.due_at),
            "local_time": iso(self.local_time),
            "attempts": self.attempts,
            "sent_at": iso(self.sent_at),
            "note": self.note,
        }


def timeline(session: Session, patient: Patient, campaigns: dict[str, Campaign]) -> list[Entry]:
    """Every delivery of every enrolment of the patient, newest enrolment first, in step order."""
    rows = session.execute(
        select(Delivery, Enrolment)
        .join(Enrolment, Delivery.enrolment_id == Enrolment.id)
        .where(Enrolment.patient_id == patient.id)
        .order_by(Enrolment.id.desc(), Delivery.id)
    ).all()
    local = zone(patient.timezone)
    entries = [
        Entry(
            delivery_id=d.id,
            enrolment_id=e.id,
            campaign=e.campaign,
            enrolment_status=e.status,
            step=d.step_key,
            state=d.state,
            due_at=d.due_at,
            local_time=d.due_at.astimezone(local) if d.due_at else None,
            attempts=d.attempts,
            sent_at=d.sent_at,
            note=_note(d),
        )
        for d, e in rows
    ]
    order = {slug: {k: i for i, k in enumerate(c.step_keys)} for slug, c in campaigns.items()}
    return sorted(
        entries,
        key=lambda x: (-x.enrolment_id, order.get(x.campaign, {}).get(x.step, 99), x.delivery_id),
    )


def _note(d: Delivery) -> str | None:
    if d.due_at is None and d.state == SCHEDULED:
        return "waiting for the first session date (drip reschedule)"
    return d.last_error
