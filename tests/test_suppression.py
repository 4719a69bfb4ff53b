"""The suppression list: keyed hashes only, checked at enrolment, at claim and before sending,
kept by `drip suppress`, `unsuppress`, `suppressions` and by hard bounces; SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import Engine, func, insert, select, text, update
from sqlalchemy.orm import Session

from drip import db, enrolment, suppression
from drip.campaigns import load_campaign
from drip.claims import claim_due
from drip.clock import Clock
from drip.models import SUPPRESSIONS, Delivery, Enrolment, Event, Patient
from drip.patients import check_patient
from drip.sending import Sender
from drip.settings import Settings
from drip.transports import MemoryTransport
from tests.conftest import TEST_SECRET
from tests.polling import wait_until

Drip = Callable[..., Result]
NOW = datetime(2026, 10, 30, 14, 1, tzinfo=UTC)
LEASE = timedelta(minutes=5)
ANA = "ana@example.com"
OTHER_KEY = "another-key-0123456789abcdefghijklmnopq"
CAMPAIGN = ("--campaign", "ketamine-onboarding")


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def enrol(drip: Drip, email: str = ANA, *extra: str) -> Result:
    return drip("enroll", email, *CAMPAIGN, "--first-name", "Ana", *extra)


def deliveries(engine: Engine) -> dict[int, tuple[str, str | None]]:
    with engine.connect() as c:
        return {d.id: (d.state, d.last_error) for d in c.execute(select(Delivery)).all()}


def table_dump(engine: Engine) -> str:
    with engine.connect() as c:
        return " ".join(str(v) for row in c.execute(select(SUPPRESSIONS)).all() for v in row)


def events(engine: Engine, kind: str) -> list[Any]:
    with engine.connect() as c:
        return list(c.execute(select(Event).where(Event.kind == kind)).all())


# --- the hashes ---


def test_the_hash_is_of_the_normalised_address_under_a_derived_key_never_the_raw_one() -> None:
    digest = suppression.address_hash(TEST_SECRET, ANA)
    assert digest == suppression.address_hash((TEST_SECRET, OTHER_KEY), "  ANA@Example.COM ")
    assert len(digest) == 64 and digest != suppression.address_hash(OTHER_KEY, ANA)
    raw = hmac.new(TEST_SECRET.encode(), ANA.encode(), hashlib.sha256).hexdigest()
    assert digest != raw  # the signing key itself is never the hashing key
    assert suppression.address_hashes((OTHER_KEY, TEST_SECRET), ANA) == [
        suppression.address_hash(OTHER_KEY, ANA),
        digest,
    ]
    assert suppression.key_id(TEST_SECRET) != suppression.key_id(OTHER_KEY)
    assert len(suppression.key_id(TEST_SECRET)) == 8


def test_the_table_holds_no_address_and_a_second_add_keeps_the_first_entry(
    engine: Engine,
) -> None:
    with db.transaction(engine) as session:
        first = suppression.add(
            session, (TEST_SECRET,), ANA, reason="manual", source="cli:x", now=NOW, actor="cli:x"
        )
        again = suppression.add(
            session,
            (OTHER_KEY, TEST_SECRET),
            "Ana@Example.com",
            reason="bounce 5.1.1",
            source="bounce",
            now=NOW,
            actor="w",
        )
    assert first.new and not again.new and again.entry == first.entry
    assert first.patient_id is None  # no such patient: the list alone
    dumped = table_dump(engine)
    assert "@" not in dumped and "ana" not in dumped.lower().replace("manual", "")
    assert suppression.key_id(TEST_SECRET) in dumped
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(SUPPRESSIONS)) == 1


def test_an_entry_made_before_a_key_rotation_is_found_and_lifted_under_every_key(
    engine: Engine,
) -> None:
    rotated = (OTHER_KEY, TEST_SECRET)
    with db.transaction(engine) as session:
        suppression.add(
            session, (TEST_SECRET,), ANA, reason="manual", source="s", now=NOW, actor="a"
        )
        found = suppression.find(session, rotated, ANA)
        assert found is not None and found.key_id == suppression.key_id(TEST_SECRET)
        assert suppression.find(session, (OTHER_KEY,), ANA) is None
        lifted = suppression.remove(session, rotated, ANA, reason="consented", now=NOW, actor="a")
        assert lifted == found and suppression.find(session, rotated, ANA) is None


def test_the_list_counts_by_reason_and_lists_the_newest_first(engine: Engine) -> None:
    with db.transaction(engine) as session:
        for i, reason in enumerate(["manual", "unsubscribed", "unsubscribed", "bounce 5.1.1"]):
            suppression.add(
                session,
                TEST_SECRET,
                f"p{i}@example.com",
                reason=reason,
                source="s",
                now=NOW + timedelta(minutes=i),
                actor="a",
            )
        assert suppression.summary(session) == {"unsubscribed": 2, "bounce 5.1.1": 1, "manual": 1}
        listed = suppression.entries(session)
    assert [e.reason for e in listed] == ["bounce 5.1.1", "unsubscribed", "unsubscribed", "manual"]
    assert listed[0].hash_prefix == suppression.address_hash(TEST_SECRET, "p3@example.com")[:12]


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_two_adds_of_one_address_at_once_on_postgresql_both_succeed_one_entry_stands(
    engine: Engine,
) -> None:
    results: dict[str, suppression.Stopped] = {}

    def second() -> None:
        with db.transaction(engine) as session:
            results["second"] = suppression.add(
                session,
                TEST_SECRET,
                ANA,
                reason="bounce 5.1.1",
                source="bounce",
                now=NOW,
                actor="w",
            )

    with db.transaction(engine) as session:
        results["first"] = suppression.add(
            session, TEST_SECRET, ANA, reason="manual", source="s", now=NOW, actor="a"
        )
        thread = threading.Thread(target=second)
        thread.start()  # its INSERT … ON CONFLICT waits for this transaction to end
        wait_until(lambda: waiting_for_a_lock(engine), "the second add to wait")
    thread.join()
    assert results["first"].new and not results["second"].new
    assert results["second"].entry.reason == "manual"
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(SUPPRESSIONS)) == 1


def waiting_for_a_lock(engine: Engine) -> bool:
    with engine.connect() as c:
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
        return bool(c.scalar(text(query)))


def test_patients_suppressed_before_the_list_are_found_then_back_filled_once(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    ok(enrol(drip))
    ok(enrol(drip, "ben@example.com"))
    with engine.begin() as c:  # as revision 0002 left them: the patients' columns only
        c.execute(
            update(Patient)
            .where(Patient.email == ANA)
            .values(suppressed_at=NOW, suppressed_reason="bounce 5.1.1")
        )
        c.execute(
            update(Patient).where(Patient.email == "ben@example.com").values(unsubscribed_at=NOW)
        )
    with db.transaction(engine) as session:
        found = suppression.find(session, settings.secret_keys, ANA)
        assert found is not None and found.reason == "bounce 5.1.1"
        ben = suppression.find(session, settings.secret_keys, "ben@example.com")
        assert ben is not None and ben.reason == "unsubscribed"
        assert suppression.backfill(session, settings.secret_keys) == 2
        assert suppression.backfill(session, settings.secret_keys) == 0
        entry = suppression.find_entry(session, settings.secret_keys, ANA)
    assert entry is not None and (entry.reason, entry.source) == ("bounce 5.1.1", "migrated")
    assert "back-filled" not in ok(drip("db", "upgrade")).stdout  # nothing left to do


def test_drip_db_upgrade_back_fills_the_list(drip: Drip, engine: Engine) -> None:
    ok(enrol(drip))
    with engine.begin() as c:
        c.execute(update(Patient).values(suppressed_at=NOW, suppressed_reason="manual"))
    said = ok(drip("db", "upgrade")).stdout
    assert "1 address(es) suppressed before revision 0003" in said
    assert json.loads(ok(drip("suppressions", "--json")).stdout)["by_reason"] == {"manual": 1}


# --- the commands ---


def test_suppress_stops_every_email_of_the_patient_and_says_so_once(
    drip: Drip, engine: Engine
) -> None:
    ok(enrol(drip))
    said = ok(drip("suppress", "ANA@example.com", "--reason", "asked by phone")).stdout
    assert said.startswith("suppressed (") and "1 enrolment(s) ended" in said
    assert {v for v in deliveries(engine).values()} == {("skipped", "suppressed: asked by phone")}
    again = ok(drip("suppress", ANA)).stdout
    assert again.startswith("already suppressed since 2026-10-30 (asked by phone)")
    [event] = events(engine, "patient.suppressed")
    assert event.actor.startswith("cli:") and "asked by phone" in event.detail
    assert "@" not in event.detail


def test_suppress_without_a_patient_lists_the_address_and_enrolling_it_is_refused(
    drip: Drip, engine: Engine
) -> None:
    assert ok(drip("suppress", "new@example.com")).stdout.startswith("suppressed (")
    refused = enrol(drip, "new@example.com")
    assert refused.exit_code == 1
    assert (
        "cannot enrol: suppressed since 2026-10-30 (manual); to enrol again, get the patient's "
        'consent and pass --resubscribe --reason "…"'
    ) in refused.stderr
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Patient)) == 0  # nothing half-written


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (("suppress", "not an address"), 1, "EMAIL: 'not an address' is not a valid address"),
        (("suppress", "a@example.com", "--reason", " "), 1, "--reason: is empty"),
        (("suppress", "a@example.com", "--reason", "x\r\nBcc: y"), 1, "control character"),
        (("unsuppress", "a@example.com"), 2, "Missing option '--reason'"),
        (("suppressions", "--email", "nope"), 1, "EMAIL: 'nope' is not a valid address"),
    ],
)
def test_bad_input_to_the_suppression_commands_is_refused_with_the_fix(
    drip: Drip, engine: Engine, args: tuple[str, ...], code: int, said: str
) -> None:
    result = drip(*args)
    assert result.exit_code == code and said in result.output, result.output
    assert table_dump(engine) == ""


def test_unsuppress_lifts_it_with_the_reason_recorded_and_enrolling_works_again(
    drip: Drip, engine: Engine
) -> None:
    ok(enrol(drip))
    ok(drip("suppress", ANA))
    lifted = ok(drip("unsuppress", ANA, "--reason", "consented in writing")).stdout
    assert lifted.startswith("no longer suppressed (was suppressed since 2026-10-30 (manual))")
    assert (
        ok(drip("unsuppress", ANA, "--reason", "again")).stdout
        == "not suppressed; nothing changed\n"
    )
    [event] = events(engine, "patient.unsuppressed")
    assert event.actor.startswith("cli:") and event.detail == "consented in writing (was manual)"
    assert "enrolled in" in ok(enrol(drip)).stdout


def test_suppressions_lists_counts_and_hash_prefixes_never_an_address(drip: Drip) -> None:
    assert ok(drip("suppressions")).stdout == "no address is suppressed\n"
    ok(drip("suppress", ANA))
    later = {"DRIP_NOW": "2026-10-31T09:00:00Z"}
    ok(drip("suppress", "ben@example.com", "--reason", "bounce 5.1.1", env=later))
    listed = ok(drip("suppressions")).stdout
    assert listed.startswith("2 suppressed: 1 bounce 5.1.1, 1 manual")
    assert "@" not in listed and "ana" not in listed
    assert suppression.address_hash(TEST_SECRET, "ben@example.com")[:12] in listed
    as_json = json.loads(ok(drip("suppressions", "--json")).stdout)
    assert as_json["total"] == 2 and [e["reason"] for e in as_json["entries"]] == [
        "bounce 5.1.1",
        "manual",
    ]
    assert set(as_json["entries"][0]) == {"hash_prefix", "key_id", "reason", "source", "created_at"}
    one = ok(drip("suppressions", "--email", "Ben@Example.com")).stdout
    assert one.startswith("suppressed since 2026-10-31 (bounce 5.1.1), source cli:")
    assert ok(drip("suppressions", "--email", "cy@example.com")).stdout == "not suppressed\n"
    checked = json.loads(ok(drip("suppressions", "--email", ANA, "--json")).stdout)
    assert checked["suppressed"] is True and checked["entry"]["reason"] == "manual"


# --- enrolment ---


def test_an_unsubscribed_patient_is_refused_and_resubscribe_needs_a_reason(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    ok(enrol(drip))
    with db.transaction(engine) as session:
        patient = session.scalars(select(Patient)).one()
        from drip.unsubscribe import make_token, unsubscribe

        unsubscribe(
            session,
            token=make_token(TEST_SECRET, patient.public_id),
            keys=settings.secret_keys,
            now=NOW,
            source="page",
        )
    refused = enrol(drip)
    assert refused.exit_code == 1 and "suppressed since 2026-10-30 (unsubscribed)" in refused.stderr
    usage = enrol(drip, ANA, "--resubscribe")
    assert usage.exit_code == 2 and '--resubscribe needs --reason "…"' in usage.stderr
    assert enrol(drip, ANA, "--reason", "x").exit_code == 2
    back = ok(enrol(drip, ANA, "--resubscribe", "--reason", "asked at the desk", "--json"))
    assert json.loads(back.stdout)["enrolled"] == 1 and json.loads(back.stdout)["resubscribed"]
    [event] = events(engine, "patient.resubscribed")
    assert event.actor.startswith("cli:") and event.detail == "asked at the desk (was unsubscribed)"
    with db.transaction(engine) as session:
        again = session.scalars(select(Patient)).one()
        assert (again.unsubscribed_at, again.suppressed_at) == (None, None)
        assert suppression.find(session, settings.secret_keys, ANA) is None
    assert "scheduled" in {state for state, _ in deliveries(engine).values()}



@pytest.mark.parametrize("reason", ["", "   "])
def test_resubscribe_with_an_empty_reason_is_refused_as_one_naming_the_reason(
    drip: Drip, engine: Engine, reason: str
) -> None:
    ok(enrol(drip))
    assert ok(drip("suppress", ANA)).stdout.startswith("suppressed (")
    refused = enrol(drip, ANA, "--resubscribe", "--reason", reason)
    assert refused.exit_code == 1 and "--reason: is empty" in refused.stderr
    assert events(engine, "patient.resubscribed") == []

def test_a_resubscribe_whose_enrolment_fails_lifts_nothing(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    ok(drip("suppress", ANA))

    class Broken(enrolment.Planner):
        def plans(self, *args: Any) -> Any:
            raise RuntimeError("the enrolment fails after the resubscribe")

    def lift(session: Session) -> None:
        suppression.remove(
            session,
            settings.secret_keys,
            ANA,
            reason="consented",
            now=NOW,
            actor="cli:x",
            kind=suppression.RESUBSCRIBED,
        )

    planner = Broken(
        load_campaign(settings.templates_dir, "ketamine-onboarding"), settings.send_window, NOW
    )
    checked = check_patient({"email": ANA, "first_name": "Ana"}, default_timezone="UTC", now=NOW)
    assert not isinstance(checked, list)
    with pytest.raises(RuntimeError):
        enrolment.enrol_retrying(
            lambda: db.transaction(engine), planner, [checked], actor="cli:x", first=lift
        )
    assert json.loads(ok(drip("suppressions", "--email", ANA, "--json")).stdout)["suppressed"]
    assert events(engine, suppression.RESUBSCRIBED) == []


def test_a_csv_leaves_suppressed_rows_out_lists_them_by_line_and_counts_them(
    drip: Drip, engine: Engine
) -> None:
    for email in ("b@example.com", "d@example.com", "e@example.com"):
        ok(drip("suppress", email, "--reason", "unsubscribed" if email < "e" else "bounce 5.1.1"))
    body = "email,first_name\n" + "".join(f"{c}@example.com,{c.upper()}\n" for c in "abcdef")
    result = ok(drip("enroll", "--csv", "-", *CAMPAIGN, input=body))
    assert "enrolled 3, already enrolled 0, 3 suppressed, refused 0 (of 6 rows)" in result.stdout
    assert "left out line 3: suppressed since 2026-10-30 (unsubscribed)" in result.stderr
    assert "left out line 6: suppressed since 2026-10-30 (bounce 5.1.1)" in result.stderr
    assert "b@example.com" not in result.output
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Patient)) == 3
    again = json.loads(ok(drip("enroll", "--csv", "-", *CAMPAIGN, "--json", input=body)).stdout)
    assert again["already_enrolled"] == 3 and again["suppressed"] == 3
    assert again["suppressed_lines"] == [
        {"line": 3, "reason": "unsubscribed", "since": "2026-10-30T14:00:00+00:00"},
        {"line": 5, "reason": "unsubscribed", "since": "2026-10-30T14:00:00+00:00"},
        {"line": 6, "reason": "bounce 5.1.1", "since": "2026-10-30T14:00:00+00:00"},
    ]


def test_a_csv_with_a_bad_row_and_a_suppressed_one_refuses_for_the_bad_row_only(
    drip: Drip,
) -> None:
    ok(drip("suppress", "b@example.com"))
    body = "email,first_name\na@example.com,A\nb@example.com,B\nnot-an-address,C\n"
    result = drip("enroll", "--csv", "-", *CAMPAIGN, "--json", input=body)
    out = json.loads(result.stdout)
    assert result.exit_code == 1 and out["refused"] == 1 and out["problems"][0]["line"] == 4


# --- claims and sending ---


def claim(engine: Engine, now: datetime = NOW) -> list[int]:
    with db.transaction(engine) as session:
        return claim_due(session, now=now, limit=100, lease=LEASE)


def test_the_due_rows_of_a_suppressed_or_unsubscribed_patient_are_skipped_never_claimed(
    drip: Drip, engine: Engine
) -> None:
    for email in ("a@example.com", "b@example.com", "c@example.com"):
        ok(enrol(drip, email))
    with engine.begin() as c:  # only the mirror, as if something slipped past the list
        c.execute(
            update(Patient).where(Patient.email == "a@example.com").values(unsubscribed_at=NOW)
        )
        c.execute(
            update(Patient)
            .where(Patient.email == "b@example.com")
            .values(suppressed_at=NOW, suppressed_reason="bounce 5.1.1")
        )
    claimed = claim(engine)
    with engine.connect() as c:
        by_email = dict(
            c.execute(
                select(Patient.email, Delivery.state + ":" + func.coalesce(Delivery.last_error, ""))
                .join(Enrolment, Enrolment.patient_id == Patient.id)
                .join(Delivery, Delivery.enrolment_id == Enrolment.id)
                .where(Delivery.step_key == "welcome")
            ).all()
        )
    assert len(claimed) == 1
    assert by_email == {
        "a@example.com": "skipped:unsubscribed",
        "b@example.com": "skipped:suppressed: bounce 5.1.1",
        "c@example.com": "claimed:",
    }


def sender(engine: Engine, settings: Settings, transport: MemoryTransport) -> Sender:
    return Sender(engine, settings, transport, Clock(NOW), rng=random.Random(7))


def test_a_row_claimed_before_the_suppression_is_not_sent(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    ok(enrol(drip))
    ids = claim(engine)
    ok(drip("suppress", ANA))
    transport = MemoryTransport()
    report = sender(engine, settings, transport).send_batch(ids)
    assert transport.messages == [] and report.sent == 0
    assert deliveries(engine)[ids[0]] == ("skipped", "suppressed: manual")


def test_the_sender_checks_the_list_itself_whatever_the_patients_columns_say(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    ok(enrol(drip))
    ok(enrol(drip, "ben@example.com"))
    ids = claim(engine)
    with engine.begin() as c:  # on the list under an older key, the mirror not set
        c.execute(
            insert(SUPPRESSIONS).values(
                address_hash=suppression.address_hash(OTHER_KEY, ANA),
                key_id="old",
                reason="bounce 5.1.1",
                source="bounce",
                created_at=NOW,
            )
        )
    rotated = Settings.from_env(
        {
            "DRIP_DATABASE_URL": settings.database_url,
            "DRIP_SECRET_KEY": f"{TEST_SECRET},{OTHER_KEY}",
            "DRIP_MAIL_URL": settings.mail_url,
            "DRIP_NOW": "2026-10-30T14:00:00Z",
        }
    )
    transport = MemoryTransport()
    report = sender(engine, rotated, transport).send_batch(ids)
    assert report.sent == 1 and report.skipped == 1
    assert [to for _, to, _ in transport.messages] == ["ben@example.com"]
    assert "suppressed: bounce 5.1.1" in {error for _, error in deliveries(engine).values()}
