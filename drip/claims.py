"""Claiming due deliveries with a lease, and taking expired leases back (the ticker's half of §1).

A claim is one conditional UPDATE (built by drip.states): on PostgreSQL the candidate rows are
picked with `FOR UPDATE SKIP LOCKED`, so any number of tickers claim disjoint sets; on SQLite the
whole transaction holds the write lock (BEGIN IMMEDIATE), which serialises tickers just as well.
Only rows of active enrolments are claimed: a paused enrolment's rows simply wait; a due row of a
patient who unsubscribed or whose address is suppressed is skipped with the reason (through
drip.states), never claimed, whatever let it stay waiting. At most one
row per patient is in flight at a time (DRIP_MIN_GAP: no burst of emails to one person); the
worker spaces the next one by the gap when it comes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session

from drip import states
from drip.db import rowcount
from drip.models import (
    ACTIVE,
    CLAIMED,
    DELIVERIES,
    ENROLMENTS,
    IN_FLIGHT_STATES,
    PATIENTS,
    RETRY,
    SCHEDULED,
)
from drip.suppression import UNSUBSCRIBED, skip_reason

D, E, P = DELIVERIES.c, ENROLMENTS.c, PATIENTS.c


def claim_due(session: Session, *, now: datetime, limit: int, lease: timedelta) -> list[int]:
    """Claim up to `limit` due rows, oldest first (rows waiting to be retried before rows never
    tried), at most one per patient and none of a patient who already has one in flight; skip
    the due rows that are past their step's age; return the ids claimed.

    One query per waiting state, each walking the (state, due_at) index in order and stopping at
    `limit`; the enrolment's status is a scalar subquery, one primary-key lookup per candidate.
    This shape matters right after a bulk enrolment: until PostgreSQL has statistics for the new
    rows (autovacuum's ANALYZE comes a minute later), a join over `state IN (…)` can be planned as
    a nested loop that compares every due row with every enrolment: 250 ms per claim at 5,000
    patients. The subquery cannot be planned that way, whatever the statistics say.
    """
    postgresql = session.get_bind().dialect.name != "sqlite"
    if postgresql:
        # The planner prices the subquery filter pessimistically (it assumes 0.5% of rows pass),
        # so with a large table the estimate crosses jit_above_cost and every claim would spend
        # 4 ms compiling (130 ms the first time in a session) to run for under one.
        session.execute(text("SET LOCAL jit = off"))
    session.execute(states.skip_expired(now=now))
    enrolment = select(E.status).where(E.id == D.enrolment_id).scalar_subquery()
    patient = select(E.patient_id).where(E.id == D.enrolment_id).scalar_subquery()
    claimed: list[int] = []
    busy: set[int] = set()
    for state in (RETRY, SCHEDULED):
        wanted = limit - len(claimed)
        if wanted <= 0:
            break
        candidates = (
            select(D.id, patient, D.expires_at)
            .where(D.state == state, D.due_at <= now, enrolment == ACTIVE)
            .order_by(D.due_at)
            .limit(wanted)
            .with_for_update(of=DELIVERIES, skip_locked=True)
        )
        rows = _skip_stopped(session, session.execute(candidates).all(), now)
        if not rows:
            continue
        patients = {p for _, p, _ in rows} - busy
        if postgresql:
            _lock_patients(session, patients)
        busy |= _in_flight(session, patients)
        ids = _one_per_patient(rows, busy)
        if ids:
            result = session.execute(states.claim(ids, state, now=now, lease=lease))
            claimed.extend(result.scalars())
    return sorted(claimed)


def _stopped(session: Session, patient_ids: set[int]) -> dict[int, str]:
    """The patients among `patient_ids` who get no more email, each with the reason a skipped
    row gives (`unsubscribed`, `suppressed: …`: the words of drip.suppression.skip_reason).
    One primary-key lookup of the patients' mirror columns, no hashing."""
    if not patient_ids:
        return {}
    rows = session.execute(
        select(P.id, P.unsubscribed_at, P.suppressed_reason).where(
            P.id.in_(sorted(patient_ids)),
            or_(P.unsubscribed_at.is_not(None), P.suppressed_at.is_not(None)),
        )
    )
    return {
        row.id: UNSUBSCRIBED
        if row.unsubscribed_at
        else skip_reason(row.suppressed_reason or "address")
        for row in rows
    }


def _skip_stopped(
    session: Session, rows: Sequence[Any], now: datetime
) -> list[tuple[int, int, datetime | None]]:
    """Skip the candidates whose patient is stopped (one statement per reason); the rest."""
    stopped = _stopped(session, {patient_id for _, patient_id, _ in rows})
    by_reason: dict[str, list[int]] = {}
    for delivery_id, patient_id, _ in rows:
        if patient_id in stopped:
            by_reason.setdefault(stopped[patient_id], []).append(delivery_id)
    for reason, ids in by_reason.items():
        states.skip(session, None, reason, now, ids=ids)
    return [(d, p, x) for d, p, x in rows if p not in stopped]


def _lock_patients(session: Session, patient_ids: set[int]) -> None:
    """PostgreSQL: hold the candidates' patients until this claim commits, in id order (no
    deadlock). A concurrent ticker that picked another row of one of them (SKIP LOCKED skips
    only the rows, not the patient) waits here, then sees this claim in its in-flight check
    (a new statement reads what has committed since): one row per patient in flight, always."""
    if patient_ids:
        session.execute(
            select(PATIENTS.c.id)
            .where(PATIENTS.c.id.in_(sorted(patient_ids)))
            .order_by(PATIENTS.c.id)
            .with_for_update()
        )


def _in_flight(session: Session, patient_ids: set[int]) -> set[int]:
    """The patients among `patient_ids` with a row claimed or being sent."""
    if not patient_ids:
        return set()
    return set(
        session.scalars(
            select(E.patient_id)
            .join(DELIVERIES, D.enrolment_id == E.id)
            .where(E.patient_id.in_(patient_ids), D.state.in_(IN_FLIGHT_STATES))
        )
    )


def _one_per_patient(rows: list[tuple[int, int, datetime | None]], busy: set[int]) -> list[int]:
    """One row of each patient not already busy (`busy` grows with the patients taken): the
    one whose step expires soonest (a "before your visit" email must not wait behind one that
    can), else the first due."""
    best: dict[int, tuple[int, tuple[bool, datetime | None, int]]] = {}
    for order, (delivery_id, patient_id, expires_at) in enumerate(rows):
        if patient_id in busy:
            continue
        rank = (expires_at is None, expires_at, order)
        if patient_id not in best or rank < best[patient_id][1]:
            best[patient_id] = (delivery_id, rank)
    busy |= best.keys()
    return [delivery_id for delivery_id, _ in best.values()]


def release(session: Session, ids: list[int], *, now: datetime) -> int:
    """Give claimed rows back at once (e.g. the broker refused them), instead of at lease expiry."""
    return states.leave(session, ids, CLAIMED, SCHEDULED, now=now)


def expire_leases(
    session: Session, *, now: datetime, retry_for: timedelta = timedelta(days=3)
) -> tuple[int, int]:
    """Expired leases come back: `claimed` → `retry` (a try: the worker holding it stopped; or
    `failed` once tried for longer than `retry_for`); `sending` → `unknown` (never resent
    automatically: the message may have arrived). Returns (given back, unknown)."""
    released = rowcount(session.execute(states.expire_claims(now=now, retry_for=retry_for)))
    unknown = rowcount(session.execute(states.expire_sending(now=now)))
    return released, unknown


def claimed_count(session: Session) -> int:
    """Rows claimed and not yet being sent: queued in Redis, or waiting in a running batch."""
    return int(session.scalar(select(func.count()).where(D.state == CLAIMED)) or 0)
