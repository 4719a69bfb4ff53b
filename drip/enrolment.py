"""Enrolling patients in a campaign and changing their plans: pause, resume, reschedule, unenrol.

Every function takes the session of the caller's transaction and the time `now`; none commits,
except `enrol_retrying`, which is given a way to open transactions and tries again in a fresh one.
Enrolling writes the patient, the enrolment and one delivery row per step of the campaign at once
(DESIGN §1). Later changes touch only rows not yet taken by a ticker, each with a conditional
UPDATE, so a change racing a ticker never un-claims a row that is already on its way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from drip import db, events, states
from drip.campaigns import Campaign
from drip.errors import InputError, NotFound
from drip.models import (
    ACTIVE,
    DELIVERIES,
    ENDED,
    ENROLMENTS,
    PATIENTS,
    PAUSED,
    SCHEDULED,
    SKIPPED,
    Delivery,
    Enrolment,
    Patient,
)
from drip.patients import PatientInput, check_first_session, email_key, new_public_id, zone
from drip.planning import FirstSession, Plan, SendWindow, plan_steps

CHUNK = 1000
ATTEMPTS = 5  # of enrol_retrying; each lost race means another process enrolled the patient


@dataclass
class EnrolCounts:
    """What an enrolment run did."""

    enrolled: int = 0
    already: int = 0
    enrolment_ids: list[int] = field(default_factory=list)  # kept for small runs only


@dataclass(frozen=True)
class Planner:
    """Plans every step of one campaign for patients enrolled at one instant."""

    campaign: Campaign
    window: SendWindow
    now: datetime
    gap: timedelta = timedelta(0)

    def plans(
        self, tz: str, enrolled_at: datetime, first_session: FirstSession | None
    ) -> list[tuple[str, Plan]]:
        plans = plan_steps(
            self.campaign.steps,
            zone=zone(tz),
            enrolled_at=enrolled_at,
            first_session=first_session,
            window=self.window,
            now=self.now,
            gap=self.gap,
        )
        return [(step.key, plan) for step, plan in zip(self.campaign.steps, plans, strict=True)]


def enrol(
    session: Session,
    planner: Planner,
    patients: Iterable[PatientInput],
    *,
    actor: str,
    progress: Callable[[int], None] | None = None,
) -> EnrolCounts:
    """Enrol each patient not already actively enrolled in the campaign, in chunks."""
    counts = EnrolCounts()
    cache: dict[tuple[str, FirstSession | None], list[tuple[str, Plan]]] = {}
    for chunk in _chunks(patients, CHUNK):
        _enrol_chunk(session, planner, chunk, actor, counts, cache)
        if progress:
            progress(len(chunk))
    return counts


def enrol_retrying(
    transaction: Callable[[], AbstractContextManager[Session]],
    planner: Planner,
    patients: Sequence[PatientInput],
    *,
    actor: str,
    first: Callable[[Session], None] | None = None,
) -> EnrolCounts:
    """`enrol` in a transaction of its own, tried again in a fresh one when another process
    enrolled the same patient at the same moment: both saw no patient (or no open enrolment),
    both inserted, and the later INSERT broke a unique index. The next attempt sees the row the
    winner committed, so the patient is "already enrolled" rather than an error. `first` runs
    in each attempt's transaction before enrolling (the suppression check, or a resubscribe):
    it commits with the enrolment, or not at all."""
    for _ in range(ATTEMPTS - 1):
        try:
            with transaction() as session:
                return _enrol_after(session, planner, patients, actor, first)
        except IntegrityError as e:
            if not db.is_unique_violation(e):
                raise
    with transaction() as session:
        return _enrol_after(session, planner, patients, actor, first)


def _enrol_after(
    session: Session,
    planner: Planner,
    patients: Sequence[PatientInput],
    actor: str,
    first: Callable[[Session], None] | None,
) -> EnrolCounts:
    if first is not None:
        first(session)
    return enrol(session, planner, patients, actor=actor)


def _enrol_chunk(
    session: Session,
    planner: Planner,
    chunk: list[PatientInput],
    actor: str,
    counts: EnrolCounts,
    cache: dict[tuple[str, FirstSession | None], list[tuple[str, Plan]]],
) -> None:
    now, slug = planner.now, planner.campaign.slug
    by_key = {p.email_key: p for p in chunk}
    ids, created = _patient_ids(session, list(by_key.values()), now)
    already = set(
        session.scalars(
            select(Enrolment.patient_id).where(
                Enrolment.patient_id.in_(ids.values()),
                Enrolment.campaign == slug,
                Enrolment.status != ENDED,
            )
        )
    )
    todo = [p for key, p in by_key.items() if ids[key] not in already]
    counts.already += len(chunk) - len(todo)
    if not todo:
        return
    _refresh_returning(session, [p for p in todo if p.email_key not in created], ids)
    rows = db.insert_many(
        session,
        ENROLMENTS,
        [_enrolment_row(ids[p.email_key], slug, p, now) for p in todo],
        ENROLMENTS.c.id,
        ENROLMENTS.c.patient_id,
    )
    by_patient = {p_id: e_id for e_id, p_id in rows}
    deliveries: list[dict[str, Any]] = []
    logged: list[dict[str, Any]] = []
    for p in todo:
        patient_id = ids[p.email_key]
        enrolment_id = by_patient[patient_id]
        key = (p.timezone, p.first_session)
        if key not in cache:
            cache[key] = planner.plans(p.timezone, now, p.first_session)
        deliveries.extend(_delivery_row(enrolment_id, k, plan, now) for k, plan in cache[key])
        logged.append(
            events.event_row(now, actor, "enrolled", patient_id, enrolment_id, None, slug)
        )
    db.insert_many(session, DELIVERIES, deliveries)
    events.record_many(session, logged)
    counts.enrolled += len(todo)
    if len(counts.enrolment_ids) < 100:
        counts.enrolment_ids.extend(by_patient[ids[p.email_key]] for p in todo[:100])


def _refresh_returning(
    session: Session, returning: list[PatientInput], ids: dict[str, int]
) -> None:
    """A patient enrolled again (after an earlier enrolment ended) gets the name and zone given
    now: the new plan is made in that zone, and the worker checks the send window in it.

    One UPDATE by primary key, executed many times in one call, not one round trip per patient:
    a CSV enrolled into a second campaign makes every row a returning patient."""
    if not returning:
        return
    session.execute(
        update(Patient),
        [
            {
                "id": ids[p.email_key],
                "first_name": p.first_name,
                "last_name": p.last_name,
                "timezone": p.timezone,
            }
            for p in returning
        ],
    )


def _patient_ids(
    session: Session, chunk: list[PatientInput], now: datetime
) -> tuple[dict[str, int], set[str]]:
    """Email key → patient id, creating the patients not seen before (their keys: the set)."""
    keys = [p.email_key for p in chunk]
    ids = dict(
        session.execute(
            select(Patient.email_key, Patient.id).where(Patient.email_key.in_(keys))
        ).all()
    )
    new = [p for p in chunk if p.email_key not in ids]
    if new:
        rows = [_patient_row(p, now) for p in new]
        ids.update(db.insert_many(session, PATIENTS, rows, PATIENTS.c.email_key, PATIENTS.c.id))
    return ids, {p.email_key for p in new}


def _patient_row(p: PatientInput, now: datetime) -> dict[str, Any]:
    return {
        "email": p.email,
        "email_key": p.email_key,
        "public_id": new_public_id(),
        "first_name": p.first_name,
        "last_name": p.last_name,
        "timezone": p.timezone,
        "created_at": now,
    }


def _enrolment_row(patient_id: int, slug: str, p: PatientInput, now: datetime) -> dict[str, Any]:
    return {
        "patient_id": patient_id,
        "campaign": slug,
        "status": ACTIVE,
        "enrolled_at": now,
        "first_session_on": p.first_session.on if p.first_session else None,
        "first_session_at": p.first_session.at if p.first_session else None,
    }


def _delivery_row(enrolment_id: int, step_key: str, plan: Plan, now: datetime) -> dict[str, Any]:
    return {
        "enrolment_id": enrolment_id,
        "step_key": step_key,
        "state": SKIPPED if plan.stale else SCHEDULED,
        "due_at": plan.due_at,
        "expires_at": plan.expires_at,
        "attempts": 0,
        "last_error": states.STALE_REASON if plan.stale else None,
        "created_at": now,
        "updated_at": now,
    }


def _chunks(items: Iterable[PatientInput], size: int) -> Iterator[list[PatientInput]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


# --- looking up -------------------------------------------------------------------------------


def find_patient(session: Session, email: str) -> Patient:
    patient = session.scalar(select(Patient).where(Patient.email_key == email_key(email)))
    if patient is None:
        raise NotFound(f"no patient with the address {email!r}; check it, or enrol them first")
    return patient


def open_enrolment(session: Session, patient: Patient, campaign: str | None) -> Enrolment:
    """The patient's active or paused enrolment; --campaign picks one when there are several.

    Locked until the caller's transaction ends (PostgreSQL; SQLite's write lock is held
    already): a pause, resume or reschedule decides on the status it read, and an unsubscribe
    ending the enrolment meanwhile must wait for it rather than be written over with `active`."""
    query = select(Enrolment).where(Enrolment.patient_id == patient.id, Enrolment.status != ENDED)
    if campaign:
        query = query.where(Enrolment.campaign == campaign)
    query = query.order_by(Enrolment.id).with_for_update()
    found = list(session.scalars(query.execution_options(populate_existing=True)))
    if not found:
        where = f" in {campaign!r}" if campaign else ""
        raise NotFound(f"patient {patient.id} is not enrolled{where}; see `drip timeline`")
    if len(found) > 1:
        slugs = ", ".join(e.campaign for e in found)
        raise InputError("--campaign", f"patient {patient.id} is enrolled in {slugs}; name one")
    return found[0]


# --- changing a plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """What a change of plan did: whether it changed anything, how many planned emails it
    cancelled, and how many were already on their way (`sending`: beyond recall)."""

    changed: bool
    cancelled: int = 0
    on_their_way: int = 0


def pause(session: Session, enrolment: Enrolment, *, now: datetime, actor: str) -> Change:
    """Hold every unsent email, including those a batch has claimed but not begun to send."""
    if enrolment.status == PAUSED:
        return Change(False)
    mine = states.of_enrolment(enrolment.id)
    enrolment.status, enrolment.paused_at = PAUSED, now
    session.flush()
    states.hold(session, mine, now=now)
    _log(session, enrolment, now, actor, "paused")
    return Change(True, on_their_way=states.in_flight(session, mine))


def resume(
    session: Session, enrolment: Enrolment, planner: Planner, tz: str, *, actor: str
) -> bool:
    """Let emails flow again; steps that fell due meanwhile follow their late policy."""
    if enrolment.status == ACTIVE:
        return False
    enrolment.status, enrolment.paused_at = ACTIVE, None
    replan(session, enrolment, planner, tz)
    _log(session, enrolment, planner.now, actor, "resumed")
    return True


def reschedule(
    session: Session,
    enrolment: Enrolment,
    planner: Planner,
    tz: str,
    first_session: str,
    *,
    actor: str,
) -> tuple[FirstSession, int]:
    """Set or move the first session and re-plan every step not yet on its way; also returns
    how many emails were already on their way (`sending`) and keep their old plan."""
    session_at = check_first_session(first_session, tz, planner.now)
    if session_at is None:
        raise InputError("--first-session", "is empty; give a date like 2026-12-03")
    enrolment.first_session_on, enrolment.first_session_at = session_at.on, session_at.at
    replan(session, enrolment, planner, tz)
    _log(session, enrolment, planner.now, actor, "rescheduled")
    return session_at, states.in_flight(session, states.of_enrolment(enrolment.id))


def unenrol(session: Session, enrolment: Enrolment, *, now: datetime, actor: str) -> Change:
    """End the enrolment and cancel every email not yet on its way, claimed ones included."""
    enrolment.status, enrolment.ended_at, enrolment.ended_reason = ENDED, now, "unenrolled"
    session.flush()
    mine = states.of_enrolment(enrolment.id)
    cancelled = states.cancel(session, mine, now=now)
    _log(session, enrolment, now, actor, "unenrolled", f"cancelled={cancelled}")
    return Change(True, cancelled, states.in_flight(session, mine))


def replan(session: Session, enrolment: Enrolment, planner: Planner, tz: str) -> None:
    """Plan again every step of the enrolment not yet on its way (claimed rows too: their
    batch finds the plan changed and leaves them)."""
    session.flush()
    first = (
        FirstSession(enrolment.first_session_on, enrolment.first_session_at)
        if enrolment.first_session_on
        else None
    )
    for step_key, plan in planner.plans(tz, enrolment.enrolled_at, first):
        session.execute(
            states.replan(
                (Delivery.enrolment_id == enrolment.id) & (Delivery.step_key == step_key),
                now=planner.now,
                due_at=plan.due_at,
                expires_at=plan.expires_at,
                stale=plan.stale,
            )
        )


def _log(
    session: Session,
    enrolment: Enrolment,
    now: datetime,
    actor: str,
    kind: str,
    detail: str | None = None,
) -> None:
    events.record(
        session,
        at=now,
        actor=actor,
        kind=kind,
        patient_id=enrolment.patient_id,
        enrolment_id=enrolment.id,
        detail=detail,
    )
