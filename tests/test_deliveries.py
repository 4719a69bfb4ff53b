"""`drip deliveries` and `drip retry`: an operator sees what failed and sends it again."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from click.testing import Result
from sqlalchemy import Engine, select, update

from drip.models import Delivery, Enrolment, Event

Drip = Callable[..., Result]


def setup(drip: Drip, engine: Engine) -> None:
    for email in ("ana@example.com", "ben@example.com"):
        result = drip("enroll", email, "--campaign", "ketamine-onboarding", "--first-name", "A")
        assert result.exit_code == 0, result.output
    with engine.begin() as c:
        c.execute(
            update(Delivery)
            .where(Delivery.id == 1)
            .values(state="failed", last_error="550 5.7.1 refused", attempts=1)
        )
        c.execute(
            update(Delivery)
            .where(Delivery.id == 2)
            .values(state="unknown", last_error="connection lost after DATA", attempts=1)
        )
        c.execute(update(Delivery).where(Delivery.id == 3).values(state="sent"))


def state(engine: Engine, delivery_id: int) -> tuple[str, object]:
    with engine.connect() as c:
        row = c.execute(select(Delivery.state, Delivery.due_at).where(Delivery.id == delivery_id))
        return tuple(row.one())  # type: ignore[return-value]


def test_deliveries_lists_by_state_with_ids_only(drip: Drip, engine: Engine) -> None:
    setup(drip, engine)
    failed = json.loads(drip("deliveries", "--state", "failed", "--json").stdout)
    assert [d["id"] for d in failed] == [1]
    assert failed[0]["last_error"] == "550 5.7.1 refused" and failed[0]["patient_id"] == 1
    assert "example.com" not in drip("deliveries", "--json").stdout
    human = drip("deliveries", "--state", "unknown")
    assert human.exit_code == 0 and "connection lost after DATA" in human.stdout


def test_retry_schedules_failed_and_unknown_rows_to_go_now(drip: Drip, engine: Engine) -> None:
    setup(drip, engine)
    result = drip("retry", "1", "2")
    assert result.exit_code == 0 and "2 deliveries scheduled" in result.stdout
    assert state(engine, 1)[0] == state(engine, 2)[0] == "scheduled"
    with engine.connect() as c:
        kinds = list(c.scalars(select(Event.kind).where(Event.kind == "delivery.retried")))
    assert len(kinds) == 2


def test_retry_is_all_or_nothing(drip: Drip, engine: Engine) -> None:
    setup(drip, engine)
    result = drip("retry", "1", "3")
    assert result.exit_code == 1
    assert "3: is sent" in result.stderr and "nothing was retried" in result.stderr
    assert state(engine, 1)[0] == "failed"  # untouched
    missing = drip("retry", "1", "999")
    assert missing.exit_code == 1 and "no delivery with id 999" in missing.stderr


def test_retry_refuses_a_paused_enrolment(drip: Drip, engine: Engine) -> None:
    setup(drip, engine)
    with engine.begin() as c:
        c.execute(update(Enrolment).where(Enrolment.id == 1).values(status="paused"))
    result = drip("retry", "1")
    assert result.exit_code == 1 and "resume it first" in result.stderr


@pytest.mark.parametrize("big", ["2147483648", "9223372036854775808", "99999999999999999999999"])
def test_retry_of_an_id_out_of_range_is_a_bad_id_and_retries_nothing(
    drip: Drip, engine: Engine, big: str
) -> None:
    """PostgreSQL's integer ids end at 2**31 - 1 (a DataError past it), SQLite's at 2**63 - 1
    (an OverflowError): an id beyond them is one no delivery has."""
    setup(drip, engine)
    result = drip("retry", "1", big)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"no delivery with id {big}" in result.stderr
    assert state(engine, 1)[0] == "failed"  # untouched
