"""Claiming due deliveries with a lease, and taking expired leases back (the ticker's half of §1).

A claim is one conditional UPDATE: on PostgreSQL the candidate rows are picked with
`FOR UPDATE SKIP LOCKED`, so any number of tickers claim disjoint sets; on SQLite the whole
transaction holds the write lock (BEGIN IMMEDIATE), which serialises tickers just as well.
Only rows of active enrolments are claimed: a paused enrolment's rows simply wait.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from drip.db import rowcount
from drip.models import (
    ACTIVE,
    CLAIMED,
    SCHEDULED,
    SENDING,
    UNKNOWN,
    WAITING_STATES,
    Delivery,
    Enrolment,
)

LOST_IN_SENDING = (
    "lease expired while sending: it may or may not have arrived; `drip retry` resends it"
)


def claim_due(session: Session, *, now: datetime, limit: int, lease: timedelta) -> list[int]:
    """Claim up to `limit` due rows, oldest first; return their ids."""
    candidates = (
        select(Delivery.id)
        .join(Enrolment, Enrolment.id == Delivery.enrolment_id)
        .where(
            Delivery.state.in_(WAITING_STATES),
            Delivery.due_at <= now,
            Enrolment.status == ACTIVE,
        )
        .order_by(Delivery.due_at)
        .limit(limit)
        .with_for_update(of=Delivery, skip_locked=True)
    )
    ids = list(session.scalars(candidates))
    if not ids:
        return []
    claimed = session.scalars(
        update(Delivery)
        .where(Delivery.id.in_(ids), Delivery.state.in_(WAITING_STATES))
        .values(state=CLAIMED, lease_until=now + lease, updated_at=now)
        .returning(Delivery.id)
    )
    return sorted(claimed)


def release(session: Session, ids: list[int], *, now: datetime) -> int:
    """Give claimed rows back at once (e.g. the broker refused them), instead of at lease expiry."""
    return rowcount(
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), Delivery.state == CLAIMED)
            .values(state=SCHEDULED, lease_until=None, updated_at=now)
        )
    )


def expire_leases(session: Session, *, now: datetime) -> tuple[int, int]:
    """Expired leases come back: `claimed` → `scheduled`; `sending` → `unknown` (never resent
    automatically: the message may have arrived). Returns (released, unknown)."""
    released = rowcount(
        session.execute(
            update(Delivery)
            .where(Delivery.state == CLAIMED, Delivery.lease_until < now)
            .values(state=SCHEDULED, lease_until=None, updated_at=now)
        )
    )
    unknown = rowcount(
        session.execute(
            update(Delivery)
            .where(Delivery.state == SENDING, Delivery.lease_until < now)
            .values(state=UNKNOWN, lease_until=None, last_error=LOST_IN_SENDING, updated_at=now)
        )
    )
    return released, unknown
