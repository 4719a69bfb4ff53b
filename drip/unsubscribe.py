"""Unsubscribing: `unsubscribe` stops every email to the patient an unsubscribe link names, in
the caller's one transaction. The links themselves (signed tokens naming the patient's random
public id) are made and read by drip.tokens, re-exported here: `drip serve` needs this module
alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from drip import events, suppression
from drip.db import rowcount
from drip.models import PATIENTS
from drip.tokens import make_token, read_token, unsubscribe_url

REASON = suppression.UNSUBSCRIBED
ACTOR = "patient"
P = PATIENTS.c
__all__ = [
    "Subscriber", "Unsubscribed", "make_token", "read_token", "subscriber", "unsubscribe",
    "unsubscribe_url",
]


@dataclass(frozen=True)
class Unsubscribed:
    """What one unsubscribe did (ids and counts only: nothing personal). `already`: the patient
    had unsubscribed before, and nothing changed. `in_flight`: emails already `sending`, beyond
    recall."""

    patient_id: int
    already: bool
    ended_enrolments: int
    skipped: int
    in_flight: int
    campaigns: tuple[str, ...]


def unsubscribe(
    session: Session, *, token: str, keys: Sequence[str], now: datetime, source: str
) -> Unsubscribed | None:
    """Stop every email to the patient a token names (None, and nothing changed, when the token
    is invalid or names no patient): their unsubscribe time, every open enrolment ended, every
    unsent delivery skipped (claimed ones too: the batch holding them finds them gone), the
    address on the suppression list, an event. In the caller's transaction.

    Idempotent, and safe when two requests come at once: the conditional UPDATE on
    `unsubscribed_at IS NULL` lets one of them do the work (PostgreSQL makes the other wait
    for its row lock, then re-checks and finds it done); the other answers `already`."""
    public_id = read_token(keys, token)
    if public_id is None:
        return None
    patient = session.execute(select(P.id, P.email).where(P.public_id == public_id)).first()
    if patient is None:
        return None
    marked = session.execute(
        update(PATIENTS)
        .where(P.id == patient.id, P.unsubscribed_at.is_(None))
        .values(unsubscribed_at=now)
    )
    if rowcount(marked) == 0:
        return Unsubscribed(patient.id, True, 0, 0, 0, ())
    halted = suppression.add(
        session, keys, patient.email, reason=REASON, source=source, now=now, actor=ACTOR
    ).halted
    events.record(
        session,
        at=now,
        actor=ACTOR,
        kind="patient.unsubscribed",
        patient_id=patient.id,
        detail=f"source={source} ended={halted.ended_enrolments} skipped={halted.skipped} "
        f"in_flight={halted.in_flight}",
    )
    return Unsubscribed(
        patient.id,
        False,
        halted.ended_enrolments,
        halted.skipped,
        halted.in_flight,
        halted.campaigns,
    )


@dataclass(frozen=True)
class Subscriber:
    """The patient a link names, as the page that asks before unsubscribing needs them: an id
    and whether they have already unsubscribed (nothing personal)."""

    patient_id: int
    unsubscribed: bool


def subscriber(session: Session, *, token: str, keys: Sequence[str]) -> Subscriber | None:
    """The patient a token names, or None when the token is invalid or names no patient. Reads
    only: link scanners open every link, so showing the page must change nothing."""
    public_id = read_token(keys, token)
    if public_id is None:
        return None
    row = session.execute(
        select(P.id, P.unsubscribed_at).where(P.public_id == public_id)
    ).first()
    return None if row is None else Subscriber(row.id, row.unsubscribed_at is not None)
