"""Enrolling and changing plans through the command line, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from subprocess import PIPE
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import Engine, func, select, text, update

from drip.models import Delivery, Enrolment, Event, Patient
from tests.polling import wait_until

Drip = Callable[..., Result]
CAMPAIGN = ("--campaign", "ketamine-onboarding")
ANA = (
    "enroll",
    "ana@example.com",
    *CAMPAIGN,
    "--first-name",
    "Ana",
    "--timezone",
    "America/New_York",
)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def timeline(drip: Drip, email: str = "ana@example.com", **kw: Any) -> dict[str, dict[str, Any]]:
    rows = json.loads(ok(drip("timeline", email, "--json", **kw)).stdout)
    return {row["step"]: row for row in rows}


def test_enrolling_plans_every_step_in_one_go(drip: Drip, engine: Engine) -> None:
    out = ok(drip(*ANA, "--first-session", "2026-11-05T14:00")).stdout
    assert "enrolled in ketamine-onboarding" in out
    plan = timeline(drip)
    assert list(plan) == [
        "welcome",
        "treatment-plan",
        "medications",
        "before-first-session",
        "after-first-session",
        "insurance",
        "check-in",
        "after-series",
    ]
    assert all(row["state"] == "scheduled" for row in plan.values())
    # DRIP_NOW is Fri 2026-10-30 10:00 EDT: the welcome goes at once…
    assert plan["welcome"]["due_at"] == "2026-10-30T14:00:00+00:00"
    assert plan["welcome"]["local_time"] == "2026-10-30T10:00:00-04:00"
    # …and a step after the fall-back keeps its local time, with the new offset.
    assert plan["before-first-session"]["due_at"] == "2026-11-03T15:00:00+00:00"
    assert plan["before-first-session"]["local_time"] == "2026-11-03T10:00:00-05:00"
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Delivery)) == 8
        kinds = c.execute(select(Event.kind, Event.actor, Event.detail)).all()
    assert kinds[0][0] == "enrolled" and kinds[0][1].startswith("cli:")


def test_enrolling_again_is_a_no_op_that_says_so(drip: Drip, engine: Engine) -> None:
    ok(drip(*ANA))
    again = ok(drip("enroll", "ANA@Example.com", *CAMPAIGN, "--first-name", "Ana"))
    assert "already enrolled" in again.stdout
    as_json = json.loads(ok(drip(*ANA, "--json")).stdout)
    assert as_json == {
        "enrolled": 0,
        "already_enrolled": 1,
        "enrolment_ids": [],
        "resubscribed": False,
    }
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Patient)) == 1
        assert c.scalar(select(func.count()).select_from(Enrolment)) == 1
        assert c.scalar(select(func.count()).select_from(Delivery)) == 8


def test_steps_waiting_for_a_first_session_say_so(drip: Drip) -> None:
    ok(drip(*ANA))
    plan = timeline(drip)
    waiting = plan["before-first-session"]
    assert waiting["due_at"] is None and waiting["state"] == "scheduled"
    assert "first session" in waiting["note"]
    human = ok(drip("timeline", "ana@example.com")).stdout
    assert "waiting for the first session" in human and "EDT" in human


def test_a_late_step_at_enrolment_follows_its_stale_policy(drip: Drip) -> None:
    # First session was 2026-10-20: the "before" email is long stale, "after" too (3d),
    # the check-in (+10d = 10-30, 5d grace) still goes, and "after-series" is in the future.
    ok(drip(*ANA, "--first-session", "2026-10-20"))
    plan = timeline(drip)
    assert plan["before-first-session"]["state"] == "skipped"
    assert plan["before-first-session"]["note"].startswith("stale")
    assert plan["after-first-session"]["state"] == "skipped"
    assert plan["check-in"]["state"] == "scheduled"
    assert plan["after-series"]["due_at"] == "2026-11-10T15:00:00+00:00"


def test_reschedule_replans_only_the_steps_not_yet_sent(drip: Drip, engine: Engine) -> None:
    ok(drip(*ANA, "--first-session", "2026-10-20"))
    with engine.begin() as c:  # the welcome went out, the check-in is on its way
        c.execute(update(Delivery).where(Delivery.step_key == "welcome").values(state="sent"))
        c.execute(update(Delivery).where(Delivery.step_key == "check-in").values(state="sending"))
        c.execute(
            update(Delivery).where(Delivery.step_key == "after-series").values(state="claimed")
        )
    before = timeline(drip)
    out = ok(drip("reschedule", "ana@example.com", "--first-session", "2026-11-20T09:30"))
    assert "2026-11-20 09:30" in out.stdout
    assert "1 email was already on its way" in out.stdout
    after = timeline(drip)
    assert after["welcome"] == before["welcome"]  # sent: untouched
    assert after["check-in"] == before["check-in"]  # on its way: beyond recall
    # claimed by a batch but not yet sending: the coordinator's change wins
    assert after["after-series"]["state"] == "scheduled"
    assert after["treatment-plan"]["state"] == "scheduled"  # not anchored to the session
    # stale-skipped steps come back to life for the new date
    assert after["before-first-session"]["state"] == "scheduled"
    assert after["before-first-session"]["local_time"] == "2026-11-18T10:00:00-05:00"
    assert after["after-series"]["local_time"] == "2026-12-11T10:00:00-05:00"


def test_reschedule_sets_a_first_session_that_was_not_known(drip: Drip) -> None:
    ok(drip(*ANA))
    ok(drip("reschedule", "ana@example.com", "--first-session", "2026-11-09"))
    assert timeline(drip)["before-first-session"]["local_time"] == "2026-11-07T10:00:00-05:00"


def test_reschedule_refuses_a_bad_date_and_changes_nothing(drip: Drip) -> None:
    ok(drip(*ANA))
    before = timeline(drip)
    result = drip("reschedule", "ana@example.com", "--first-session", "2025-01-01")
    assert result.exit_code == 1 and "first_session" in result.stderr
    assert "30 days ago" in result.stderr and "Traceback" not in result.output
    assert timeline(drip) == before


def test_pause_holds_and_resume_replans_what_fell_due(drip: Drip, engine: Engine) -> None:
    ok(drip(*ANA, "--first-session", "2026-11-05"))
    assert ok(drip("pause", "ana@example.com")).stdout.strip() == "paused"
    assert "already paused" in ok(drip("pause", "ana@example.com")).stdout
    with engine.connect() as c:
        assert c.scalar(select(Enrolment.status)) == "paused"
    assert "ketamine-onboarding (paused)" in ok(drip("timeline", "ana@example.com")).stdout
    # Resume a week later: everything that fell due meanwhile follows its late policy.
    later = {"DRIP_NOW": "2026-11-06T15:00:00Z"}
    assert "resumed" in ok(drip("resume", "ana@example.com", env=later)).stdout
    plan = timeline(drip)
    # late ones go one at a time, in step order, each DRIP_MIN_GAP (12h) after the one before,
    # inside the send window (09:00 EST is 14:00 UTC)
    assert plan["before-first-session"]["state"] == "skipped"  # useless after the visit
    assert plan["welcome"]["due_at"] == "2026-11-06T15:00:00+00:00"
    assert plan["treatment-plan"]["due_at"] == "2026-11-07T14:00:00+00:00"
    assert plan["medications"]["due_at"] == "2026-11-08T14:00:00+00:00"
    assert plan["after-first-session"]["due_at"] == "2026-11-09T14:00:00+00:00"  # within 3d
    assert plan["after-first-session"]["state"] == "scheduled"
    assert plan["check-in"]["local_time"] == "2026-11-15T10:00:00-05:00"  # still ahead
    assert "not paused" in ok(drip("resume", "ana@example.com", env=later)).stdout
    with engine.connect() as c:
        assert [k for (k,) in c.execute(select(Event.kind).order_by(Event.id))] == [
            "enrolled",
            "paused",
            "resumed",
        ]


def test_unenroll_cancels_what_is_not_yet_on_its_way(drip: Drip, engine: Engine) -> None:
    ok(drip(*ANA, "--first-session", "2026-11-05"))
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.step_key == "welcome").values(state="sent"))
    assert "7 planned email(s) cancelled" in ok(drip("unenroll", "ana@example.com")).stdout
    states = {step: row["state"] for step, row in timeline(drip).items()}
    assert states.pop("welcome") == "sent"
    assert set(states.values()) == {"cancelled"}
    # an ended enrolment is not "open": enrolling again starts afresh
    assert "enrolled in" in ok(drip(*ANA)).stdout
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Enrolment)) == 2


def test_changes_to_an_unknown_patient_name_the_fix(drip: Drip) -> None:
    for command in (
        ["pause"],
        ["resume"],
        ["unenroll"],
        ["timeline"],
        ["reschedule", "--first-session", "2026-11-09"],
    ):
        result = drip(command[0], "nobody@example.com", *command[1:])
        assert result.exit_code == 1, command
        assert "no patient with the address" in result.stderr and "enrol" in result.stderr


def test_pause_after_unenroll_says_not_enrolled(drip: Drip) -> None:
    ok(drip(*ANA))
    ok(drip("unenroll", "ana@example.com"))
    result = drip("pause", "ana@example.com")
    assert result.exit_code == 1 and "not enrolled" in result.stderr


def test_enrolling_into_an_unknown_campaign_names_the_campaigns(drip: Drip) -> None:
    result = drip("enroll", "ana@example.com", "--campaign", "onboard", "--first-name", "A")
    assert result.exit_code == 1
    assert "no campaign 'onboard'" in result.stderr and "ketamine-onboarding" in result.stderr


def test_bad_input_lists_every_field_and_writes_nothing(drip: Drip, engine: Engine) -> None:
    result = drip(
        "enroll", "ana@@example.com", *CAMPAIGN, "--first-name", "A\nB", "--timezone", "Moon/Base"
    )
    assert result.exit_code == 1
    for field in ("email:", "first_name:", "timezone:"):
        assert field in result.stderr
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Patient)) == 0


def test_usage_errors_exit_2(drip: Drip) -> None:
    assert drip("enroll", *CAMPAIGN).exit_code == 2  # neither EMAIL nor --csv
    assert drip("enroll", "a@example.com", *CAMPAIGN).exit_code == 2  # no --first-name
    assert drip("enroll", "a@example.com", "--first-name", "A").exit_code == 2  # no --campaign
    assert drip("reschedule", "a@example.com").exit_code == 2


def test_names_and_addresses_stay_out_of_the_event_log(drip: Drip, engine: Engine) -> None:
    ok(drip(*ANA, "--last-name", "Lopez", "--first-session", "2026-11-05"))
    ok(drip("pause", "ana@example.com"))
    ok(drip("unenroll", "ana@example.com"))
    with engine.connect() as c:
        logged = " ".join(str(v) for row in c.execute(select(Event)).all() for v in row)
    assert "Ana" not in logged and "Lopez" not in logged and "example.com" not in logged


def test_a_patient_in_two_campaigns_must_name_one(drip: Drip, engine: Engine) -> None:
    ok(drip(*ANA))
    with engine.begin() as c:  # a second open enrolment, as another campaign would make
        enrolment = c.execute(select(Enrolment)).one()
        c.execute(
            Enrolment.__table__.insert().values(
                patient_id=enrolment.patient_id,
                campaign="other",
                status="active",
                enrolled_at=enrolment.enrolled_at,
            )
        )
    result = drip("pause", "ana@example.com")
    assert result.exit_code == 1 and "--campaign" in result.stderr
    assert ok(drip("pause", "ana@example.com", "--campaign", "other")).stdout.strip() == "paused"


def test_enrolling_again_after_unenrolling_takes_the_new_zone(drip: Drip, engine: Engine) -> None:
    ok(drip(*ANA))
    ok(drip("unenroll", "ana@example.com"))
    ok(
        drip(
            "enroll",
            "ana@example.com",
            *CAMPAIGN,
            "--first-name",
            "Ana María",
            "--timezone",
            "Europe/London",
        )
    )
    with engine.connect() as c:
        assert c.execute(select(Patient.first_name, Patient.timezone)).one() == (
            "Ana María",
            "Europe/London",
        )
    newest = [
        row
        for row in json.loads(ok(drip("timeline", "ana@example.com", "--json")).stdout)
        if row["enrolment_status"] == "active"
    ]
    assert newest[0]["local_time"].endswith("+00:00")  # London, GMT in October's end


def _enrol_at_once(env: dict[str, str], n: int) -> list[subprocess.Popen[str]]:
    """`drip enroll` of one address by `n` processes at once."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
    command = [sys.executable, "-m", "drip", "enroll", "same@example.com"]
    command += ["--campaign", "ketamine-onboarding", "--first-name", "Sam"]
    return [
        subprocess.Popen(command, env=clean | env, stdout=PIPE, stderr=PIPE, text=True)
        for _ in range(n)
    ]


def _waiting_for_a_lock(engine: Engine) -> int:
    with engine.connect() as c:  # a new transaction each time: pg_stat_activity is a snapshot
        return int(
            c.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            )
        )


@pytest.mark.parametrize("returning", [False, True], ids=["new-patient", "returning-patient"])
def test_enrolments_of_one_patient_at_the_same_moment_enrol_once_and_all_succeed(
    drip: Drip, engine: Engine, env: dict[str, str], db_kind: str, returning: bool
) -> None:
    """Six processes enrol the same address at once: one enrols, five find them already enrolled.

    On PostgreSQL a lock held by the test stops every process at its INSERT (the patient's, or
    for a returning patient the enrolment's) until all six are waiting there, so that their
    INSERTs collide on the unique index; SQLite serialises writers at BEGIN IMMEDIATE."""
    if returning:
        assert (
            drip(
                "enroll",
                "same@example.com",
                "--campaign",
                "ketamine-onboarding",
                "--first-name",
                "Sam",
            ).exit_code
            == 0
        )
        assert drip("unenroll", "same@example.com").exit_code == 0
    table = "enrolments" if returning else "patients"
    n = 6
    with engine.connect() as gate:
        if db_kind == "postgresql":
            gate.execute(text(f"LOCK TABLE {table} IN SHARE MODE"))
        processes = _enrol_at_once(env, n)
        if db_kind == "postgresql":
            wait_until(lambda: _waiting_for_a_lock(engine) == n, f"{n} enrolments at INSERT")
        gate.rollback()
    outcomes = [(p.wait(timeout=120), *p.communicate()) for p in processes]
    assert [code for code, _, _ in outcomes] == [0] * n, outcomes
    said = sorted(out.split(" (")[0].split(";")[0] for _, out, _ in outcomes)
    assert said == ["already enrolled in ketamine-onboarding"] * (n - 1) + [
        "enrolled in ketamine-onboarding"
    ], outcomes
    with engine.connect() as c:
        open_ = c.scalar(
            select(func.count()).select_from(Enrolment).where(Enrolment.status != "ended")
        )
    assert open_ == 1
