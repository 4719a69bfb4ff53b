"""`drip deliveries` and `drip retry`: an operator sees what failed and sends it again."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import pytest
from click.testing import Result
from sqlalchemy import Engine, select, update

from drip.models import Delivery, Enrolment, Event
from tests.conftest import NOW

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



def test_retry_refuses_the_rows_of_a_patient_who_is_suppressed_and_says_so(
    drip: Drip, engine: Engine
) -> None:
    setup(drip, engine)
    assert drip("suppress", "ana@example.com", "--reason", "asked by phone").exit_code == 0
    result = drip("retry", "1")
    assert result.exit_code == 1 and state(engine, 1)[0] == "failed"
    # why it cannot go, not "resume it first": an enrolment a suppression ended stays ended
    assert "1: the patient unsubscribed or the address is suppressed" in result.stderr
    by_state = drip("retry", "--state", "unknown")
    assert "2: the patient unsubscribed" in by_state.output and state(engine, 2)[0] == "unknown"

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


def test_deliveries_filters_by_email_campaign_and_since(drip: Drip, engine: Engine) -> None:
    setup(drip, engine)
    ben = json.loads(drip("deliveries", "--email", "BEN@example.com", "--json").stdout)
    assert ben and {d["patient_id"] for d in ben} == {2}
    assert all(d["campaign"] == "ketamine-onboarding" for d in ben)
    assert json.loads(drip("deliveries", "--campaign", "other", "--json").stdout) == []
    with engine.begin() as c:  # row 1 changed two days before the calendar's now
        c.execute(
            update(Delivery).where(Delivery.id == 1).values(updated_at=NOW - timedelta(days=2))
        )
    recent = {d["id"] for d in json.loads(drip("deliveries", "--since", "1d", "--json").stdout)}
    assert 1 not in recent and 2 in recent
    since_date = drip("deliveries", "--since", "2026-10-27", "--json").stdout
    assert 1 in {d["id"] for d in json.loads(since_date)}


def test_deliveries_of_an_unknown_patient_or_a_bad_since_is_a_clear_error(
    drip: Drip, engine: Engine
) -> None:
    setup(drip, engine)
    nobody = drip("deliveries", "--email", "nobody@example.com")
    assert nobody.exit_code == 1 and "no patient with the address" in nobody.stderr
    bad = drip("deliveries", "--since", "last tuesday")
    assert bad.exit_code == 1 and "--since" in bad.stderr and "30m, 2h, 3d" in bad.stderr
    typo = drip("deliveries", "--campaign", "ketamine-onbording")
    assert typo.exit_code == 0 and "no campaign 'ketamine-onbording'" in typo.stderr


def events_of(engine: Engine, kind: str) -> list[tuple[int | None, str, str | None]]:
    with engine.connect() as c:
        rows = c.execute(
            select(Event.delivery_id, Event.actor, Event.detail)
            .where(Event.kind == kind)
            .order_by(Event.delivery_id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def test_each_retry_is_an_event_naming_the_operator_and_the_state_it_left(
    drip: Drip, engine: Engine
) -> None:
    setup(drip, engine)
    assert drip("retry", "1", "2").exit_code == 0
    (one, two) = events_of(engine, "delivery.retried")
    assert one[0] == 1 and one[1].startswith("cli:") and one[2] == "was failed"
    assert two[0] == 2 and two[2] == "was unknown"


def test_retry_names_every_bad_id_at_once_and_retries_nothing(drip: Drip, engine: Engine) -> None:
    setup(drip, engine)
    result = drip("retry", "1", "3", "999", "998")
    assert result.exit_code == 1
    assert "no delivery with id 999, 998" in result.stderr
    assert "3: is sent" in result.stderr
    assert state(engine, 1)[0] == "failed" and events_of(engine, "delivery.retried") == []


def test_retry_dry_run_shows_what_would_go_and_changes_nothing(drip: Drip, engine: Engine) -> None:
    setup(drip, engine)
    result = drip("retry", "1", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would retry 2 deliveries" in result.stdout and "550 5.7.1 refused" in result.stdout
    assert state(engine, 1)[0] == "failed" and state(engine, 2)[0] == "unknown"
    assert events_of(engine, "delivery.retried") == []
    refused = drip("retry", "1", "3", "--dry-run")
    assert refused.exit_code == 1 and "3: is sent" in refused.stderr


def test_retry_by_state_sends_what_can_go_and_lists_what_cannot(
    drip: Drip, engine: Engine
) -> None:
    setup(drip, engine)
    with engine.begin() as c:  # a second failed row, of a paused enrolment
        c.execute(update(Delivery).where(Delivery.id == 9).values(state="failed"))
        c.execute(update(Enrolment).where(Enrolment.id == 2).values(status="paused"))
    dry = drip("retry", "--state", "failed", "--dry-run")
    assert dry.exit_code == 0 and "would retry 1 deliveries" in dry.stdout
    assert "left alone: 9: its enrolment is paused" in dry.stderr
    assert state(engine, 1)[0] == "failed"
    result = drip("retry", "--state", "failed")
    assert result.exit_code == 0 and "1 deliveries scheduled" in result.stdout
    assert state(engine, 1)[0] == "scheduled" and state(engine, 9)[0] == "failed"
    assert state(engine, 2)[0] == "unknown"  # another state: untouched


def test_retry_older_than_takes_only_rows_that_failed_long_enough_ago(
    drip: Drip, engine: Engine
) -> None:
    setup(drip, engine)
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.id == 1).values(updated_at=NOW))
        c.execute(
            update(Delivery)
            .where(Delivery.id == 4)
            .values(state="failed", updated_at=NOW - timedelta(hours=3))
        )
    result = drip("retry", "--state", "failed", "--older-than", "2h")
    assert result.exit_code == 0 and "1 deliveries scheduled" in result.stdout
    assert state(engine, 4)[0] == "scheduled" and state(engine, 1)[0] == "failed"
    none = drip("retry", "--state", "unknown", "--older-than", "2h")
    assert none.exit_code == 0 and "no unknown deliveries can be retried" in none.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["retry", "1", "--state", "failed"],
        ["retry"],
        ["retry", "1", "--older-than", "2h"],
        ["retry", "--state", "sent"],
    ],
)
def test_retry_usage_errors_are_exit_2(drip: Drip, engine: Engine, args: list[str]) -> None:
    setup(drip, engine)
    result = drip(*args)
    assert result.exit_code == 2, result.output
    assert state(engine, 1)[0] == "failed"


def test_retry_older_than_must_be_a_duration(drip: Drip, engine: Engine) -> None:
    setup(drip, engine)
    result = drip("retry", "--state", "failed", "--older-than", "yesterday")
    assert result.exit_code == 1 and "--older-than" in result.stderr
