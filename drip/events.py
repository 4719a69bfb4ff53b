"""The append-only event log: who did what to which ids, when. Never names, addresses or bodies."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from drip import db
from drip.models import EVENTS


def record(
    session: Session,
    *,
    at: datetime,
    actor: str,
    kind: str,
    patient_id: int | None = None,
    enrolment_id: int | None = None,
    delivery_id: int | None = None,
    detail: str | None = None,
) -> None:
    """Append one event."""
    record_many(
        session, [event_row(at, actor, kind, patient_id, enrolment_id, delivery_id, detail)]
    )


def event_row(
    at: datetime,
    actor: str,
    kind: str,
    patient_id: int | None = None,
    enrolment_id: int | None = None,
    delivery_id: int | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    return {
        "at": at,
        "actor": actor[:64],
        "kind": kind,
        "patient_id": patient_id,
        "enrolment_id": enrolment_id,
        "delivery_id": delivery_id,
        "detail": detail[:500] if detail else None,
    }


def record_many(session: Session, rows: Iterable[dict[str, Any]]) -> None:
    """Append many events in one go."""
    db.insert_many(session, EVENTS, list(rows))
