"""Claiming due rows with a lease, and taking expired leases back, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import Result
from sqlalchemy import Engine, select, update

from drip import db
from drip.claims import claim_due, expire_leases, release
from drip.models import Delivery, Enrolment

Drip = Callable[..., Result]
NOW = datetime(2026, 10, 30, 14, 0, tzinfo=UTC)
LEASE = timedelta(seconds=300)


def enrol(drip: Drip, n: int, **env: str) -> None:
    body = "email,first_name,first_session\n" + "".join(
        f"p{i}@example.com,P{i},2026-11-05\n" for i in range(n)
    )
    result = drip("enroll", "--csv", "-", "--campaign", "ketamine-onboarding", input=body)
    assert result.exit_code == 0, result.output


def claim(
    engine: Engine, now: datetime = NOW + timedelta(minutes=1), limit: int = 1000
) -> list[int]:
    with db.transaction(engine) as session:
        return claim_due(session, now=now, limit=limit, lease=LEASE)


def states(engine: Engine) -> dict[int, str]:
    with engine.connect() as c:
        return dict(c.execute(select(Delivery.id, Delivery.state)).all())


def test_only_due_rows_of_active_enrolments_are_claimed(drip: Drip, engine: Engine) -> None:
    enrol(drip, 3)
    ids = claim(engine)
    assert len(ids) == 3  # the three welcomes, due now
    assert {states(engine)[i] for i in ids} == {"claimed"}
    assert claim(engine) == []  # nothing else is due yet
    # a week later, everything planned by then is due; a paused enrolment's rows wait
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.id.in_(ids)).values(state="sent"))
        c.execute(update(Enrolment).where(Enrolment.id == 1).values(status="paused"))
    later = claim(engine, NOW + timedelta(days=7))
    assert later and all(i not in ids for i in later)
    with engine.connect() as c:
        paused_rows = set(c.scalars(select(Delivery.id).where(Delivery.enrolment_id == 1)))
    assert not paused_rows & set(later)


def test_claims_come_in_batches_oldest_first(drip: Drip, engine: Engine) -> None:
    enrol(drip, 5)
    first = claim(engine, NOW + timedelta(days=30), limit=4)
    assert len(first) == 4
    with engine.connect() as c:
        due = dict(c.execute(select(Delivery.id, Delivery.due_at)).all())
    rest = [i for i in due if i not in first and due[i] is not None]
    assert max(due[i] for i in first) <= min(due[i] for i in rest)


def test_expired_leases_come_back_claimed_to_scheduled_sending_to_unknown(
    drip: Drip, engine: Engine
) -> None:
    enrol(drip, 2)
    a, b = claim(engine)
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.id == b).values(state="sending"))
    with db.transaction(engine) as session:
        assert expire_leases(session, now=NOW + LEASE) == (0, 0)
    with db.transaction(engine) as session:
        assert expire_leases(session, now=NOW + LEASE + timedelta(minutes=2)) == (1, 1)
    now = states(engine)
    # claimed → retry: the worker holding it stopped; that counts as a try
    assert now[a] == "retry" and now[b] == "unknown"
    with engine.connect() as c:
        assert "drip retry" in c.scalar(select(Delivery.last_error).where(Delivery.id == b))
        assert c.scalar(select(Delivery.attempts).where(Delivery.id == a)) == 1
    assert claim(engine, NOW + LEASE + timedelta(minutes=3)) == [a]  # unknown is never resent


def test_a_row_whose_lease_runs_out_again_and_again_fails_after_drip_retry_for(
    drip: Drip, engine: Engine
) -> None:
    """No poison rows: a row that crashes every worker that takes it is not claimed for ever."""
    enrol(drip, 1)
    [a] = claim(engine)
    later = NOW
    for _ in range(3):
        later += LEASE + timedelta(minutes=2)
        with db.transaction(engine) as session:
            assert expire_leases(session, now=later, retry_for=timedelta(hours=1)) == (1, 0)
        assert claim(engine, later) == [a]
    later += timedelta(hours=1)
    with db.transaction(engine) as session:
        expire_leases(session, now=later, retry_for=timedelta(hours=1))
    assert states(engine)[a] == "failed"
    assert a not in claim(engine, later + timedelta(days=1))


def test_at_most_one_row_per_patient_is_in_flight(drip: Drip, engine: Engine) -> None:
    """DRIP_MIN_GAP: a patient's overdue emails are not claimed together (no burst)."""
    enrol(drip, 2)
    month = NOW + timedelta(days=30)
    first = claim(engine, month)
    assert len(first) == 2  # one per patient, though all eight are due
    assert claim(engine, month) == []  # nothing more while theirs are in flight
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.id.in_(first)).values(state="sent"))
    second = claim(engine, month)
    assert len(second) == 2 and not set(second) & set(first)


def test_a_due_row_past_its_steps_age_is_skipped_not_claimed(drip: Drip, engine: Engine) -> None:
    """The late policy holds at claim time: workers back after days away do not send
    "getting ready for your first visit" after the visit."""
    enrol(drip, 1)
    with engine.begin() as c:
        c.execute(update(Delivery).values(state="sent"))
        c.execute(
            update(Delivery)
            .where(Delivery.step_key == "before-first-session")
            .values(state="scheduled")
        )
    after_visit = datetime(2026, 11, 6, 15, 0, tzinfo=NOW.tzinfo)
    assert claim(engine, after_visit) == []
    with engine.connect() as c:
        state, reason = c.execute(
            select(Delivery.state, Delivery.last_error).where(
                Delivery.step_key == "before-first-session"
            )
        ).one()
    assert state == "skipped" and reason.startswith("stale")


def test_release_gives_claimed_rows_back_at_once(drip: Drip, engine: Engine) -> None:
    enrol(drip, 2)
    ids = claim(engine)
    with db.transaction(engine) as session:
        assert release(session, ids, now=NOW) == 2
    assert sorted(claim(engine)) == sorted(ids)


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_concurrent_tickers_never_claim_the_same_row(drip: Drip, engine: Engine) -> None:
    enrol(drip, 300)
    claimed: list[list[int]] = []
    errors: list[BaseException] = []

    def ticker() -> None:
        try:
            while ids := claim(engine, NOW + timedelta(days=60), limit=25):
                claimed.append(ids)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ticker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    every = [i for batch in claimed for i in batch]
    assert len(every) == len(set(every))
    with engine.connect() as c:
        planned = c.scalar(select(Delivery.id).where(Delivery.due_at.is_not(None)).limit(1))
    assert planned is not None
    assert set(every) == {i for i, s in states(engine).items() if s == "claimed"}
    assert len(every) == 300  # one row of every patient: no more while it is in flight
