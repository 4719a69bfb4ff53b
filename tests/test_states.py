"""The statements of drip.states that unsubscribing and suppressing use, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, insert, select

from drip import db, states
from drip.models import DELIVERIES, ENROLMENTS, PATIENTS, STATES
from drip.patients import new_public_id

NOW = datetime(2026, 10, 30, 14, 0, tzinfo=UTC)
LEASE_UNTIL = NOW + timedelta(minutes=5)


def patient_with_every_state(engine: Engine, email: str) -> int:
    """A patient with two enrolments whose rows are in every delivery state; its id."""
    with db.transaction(engine) as session:
        patient_id = session.execute(
            insert(PATIENTS)
            .values(
                email=email,
                email_key=email,
                public_id=new_public_id(),
                first_name="P",
                timezone="UTC",
                created_at=NOW,
            )
            .returning(PATIENTS.c.id)
        ).scalar_one()
        for campaign, status in (("one", "active"), ("two", "paused")):
            enrolment_id = session.execute(
                insert(ENROLMENTS)
                .values(patient_id=patient_id, campaign=campaign, status=status, enrolled_at=NOW)
                .returning(ENROLMENTS.c.id)
            ).scalar_one()
            session.execute(
                insert(DELIVERIES),
                [
                    {
                        "enrolment_id": enrolment_id,
                        "step_key": state,
                        "state": state,
                        "due_at": NOW,
                        "attempts": 0,
                        "lease_until": LEASE_UNTIL,
                        "created_at": NOW,
                        "updated_at": NOW,
                    }
                    for state in STATES
                ],
            )
    return patient_id


def rows(engine: Engine) -> list[tuple[int, str, str, str | None, datetime | None]]:
    with engine.connect() as c:
        query = select(
            ENROLMENTS.c.patient_id,
            DELIVERIES.c.step_key,
            DELIVERIES.c.state,
            DELIVERIES.c.last_error,
            DELIVERIES.c.lease_until,
        ).join(ENROLMENTS, ENROLMENTS.c.id == DELIVERIES.c.enrolment_id)
        return [tuple(row) for row in c.execute(query)]


def test_skip_takes_every_unsent_row_of_one_patient_in_every_enrolment_and_nothing_else(
    engine: Engine,
) -> None:
    ana = patient_with_every_state(engine, "ana@example.com")
    ben = patient_with_every_state(engine, "ben@example.com")
    with db.transaction(engine) as session:
        skipped = states.skip(session, states.of_patient(ana), "unsubscribed", NOW)
        in_flight = states.in_flight(session, states.of_patient(ana))
    assert skipped == 2 * len(states.UNSENT) and in_flight == 2
    for patient_id, step, state, error, lease in rows(engine):
        if patient_id == ana and step in states.UNSENT:  # scheduled, retry, claimed
            assert (state, error, lease) == ("skipped", "unsubscribed", None)
        else:  # sending, sent, failed…: untouched; Ben: untouched
            assert (state, error, lease) == (step, None, LEASE_UNTIL)
    assert {p for p, *_ in rows(engine)} == {ana, ben}


def test_skip_by_ids_leaves_rows_no_longer_unsent(engine: Engine) -> None:
    patient_with_every_state(engine, "ana@example.com")
    with engine.connect() as c:
        ids = dict(c.execute(select(DELIVERIES.c.step_key, DELIVERIES.c.id)).all())
    with db.transaction(engine) as session:
        assert states.skip(session, None, "suppressed: manual", NOW, ids=list(ids.values())) == 3


def test_a_skip_from_a_state_the_table_forbids_is_refused_when_built() -> None:
    with pytest.raises(states.TransitionError):
        states.move(["sent"], "skipped", where=states.of_patient(1), now=NOW)
