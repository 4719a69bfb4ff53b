"""Unsubscribe tokens (a malformed or forged token names no patient, and never raises) and
unsubscribe(): every open enrolment ended, every unsent email skipped, the address suppressed,
once, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import Engine, func, insert, select, text

from drip import db, suppression
from drip.claims import claim_due
from drip.models import (
    DELIVERIES,
    ENROLMENTS,
    EVENTS,
    PATIENTS,
    SUPPRESSIONS,
    Delivery,
    Enrolment,
    Event,
    Patient,
)
from drip.patients import new_public_id
from drip.settings import Settings
from drip.unsubscribe import Unsubscribed, make_token, read_token, unsubscribe, unsubscribe_url
from tests.conftest import TEST_SECRET
from tests.polling import wait_until

Drip = Callable[..., Result]

KEY = "unsubscribe-test-key-0123456789abcdef"
PUBLIC_ID = "q8Xo3mZ0bR1uV2wT4yA5cQ"  # a public id as drip.patients.new_public_id makes them
OLD_KEY = "an-older-key-still-verifying-0123456789"
ODD = "0123456789.-_=+/ \t\n\x00abcXYZé١٢٣²³½ⅷ𝟗٫。．\u200b\ufeff\ud800"


def malformed_tokens() -> list[str]:
    """Hand-picked shapes, then seeded random strings and mutations of a good token."""
    good = make_token(KEY, PUBLIC_ID)
    sig = good.split(".")[1]
    picked = [
        "",
        ".",
        "..",
        "١٢.abc",
        "²",
        "1.\u00e9",
        "1." + "é" * 22,
        "42",
        "42.",
        ".sig",
        "9" * 13 + ".x",
        "9" * 5000,
        "-1." + sig,
        "42." + sig,
        PUBLIC_ID,
        PUBLIC_ID + ".",
        " " + good,
        good + " ",
        good + "=",
        good + ".",
        good + "\n",
        good[:-1],
        good[1:],
        good.upper(),
        good.lower(),
        PUBLIC_ID + "." + "\ud800" * 22,
        "x" * 100_000,
        f"{PUBLIC_ID}={sig}",
        f"{sig}.{PUBLIC_ID}",
        f"{PUBLIC_ID}.{sig}.{sig}",
    ]
    rng = random.Random(8)
    for _ in range(2000):
        picked.append("".join(rng.choice(ODD) for _ in range(rng.randint(0, 40))))
        chars = list(good)
        chars[rng.randrange(len(chars))] = rng.choice(ODD)
        picked.append("".join(chars))
    return [token for token in picked if token != good]


def test_every_malformed_token_reads_as_no_patient() -> None:
    for token in malformed_tokens():
        assert read_token(KEY, token) is None, repr(token)


def test_a_good_token_reads_back_its_public_id() -> None:
    assert read_token(KEY, make_token(KEY, PUBLIC_ID)) == PUBLIC_ID
    assert read_token(OLD_KEY, make_token(KEY, PUBLIC_ID)) is None
    assert read_token((OLD_KEY,), make_token(KEY, PUBLIC_ID)) is None


@pytest.mark.parametrize("signer", [KEY, OLD_KEY])
def test_any_of_several_keys_verifies(signer: str) -> None:
    assert read_token((KEY, OLD_KEY), make_token(signer, PUBLIC_ID)) == PUBLIC_ID
    assert read_token((), make_token(signer, PUBLIC_ID)) is None


def test_a_token_signed_for_one_public_id_does_not_name_another() -> None:
    other = new_public_id()
    forged = f"{other}.{make_token(KEY, PUBLIC_ID).split('.')[1]}"
    assert read_token(KEY, forged) is None


def test_public_ids_are_22_url_safe_characters_and_all_different() -> None:
    ids = {new_public_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 22 and read_token(KEY, make_token(KEY, i)) == i for i in ids)


# --- unsubscribe(): what it changes, in one transaction -----------------------------------------

NOW = datetime(2026, 10, 30, 14, 1, tzinfo=UTC)
LEASE = timedelta(minutes=5)
ANA = "ana@example.com"


def enrol(drip: Drip, *emails: str) -> None:
    for email in emails or (ANA,):
        result = drip(
            "enroll",
            email,
            "--campaign",
            "ketamine-onboarding",
            "--first-name",
            "Zoë",
            "--first-session",
            "2026-11-09",
        )
        assert result.exit_code == 0, result.output


def patient(engine: Engine, email: str = ANA) -> Patient:
    with db.transaction(engine) as session:
        return session.scalars(select(Patient).where(Patient.email == email)).one()


def token(engine: Engine, email: str = ANA, key: str = TEST_SECRET) -> str:
    return make_token(key, patient(engine, email).public_id)


def run(engine: Engine, settings: Settings, token: str, **kw: Any) -> Unsubscribed | None:
    with db.transaction(engine) as session:
        return unsubscribe(
            session,
            token=token,
            keys=kw.get("keys", settings.secret_keys),
            now=kw.get("now", NOW),
            source="one-click",
        )


def deliveries(engine: Engine) -> dict[int, tuple[str, str | None]]:
    with engine.connect() as c:
        return {d.id: (d.state, d.last_error) for d in c.execute(select(Delivery)).all()}


def snapshot(engine: Engine) -> tuple[Any, ...]:
    with engine.connect() as c:
        return tuple(
            sorted(tuple(map(str, row)) for row in c.execute(select(table)).all())
            for table in (PATIENTS, ENROLMENTS, DELIVERIES, EVENTS, SUPPRESSIONS)
        )


def second_campaign(engine: Engine, patient_id: int, **states: str) -> dict[str, int]:
    """A paused enrolment in another campaign, with one delivery per (step → state)."""
    with db.transaction(engine) as session:
        enrolment_id = session.execute(
            insert(ENROLMENTS)
            .values(patient_id=patient_id, campaign="other", status="paused", enrolled_at=NOW)
            .returning(ENROLMENTS.c.id)
        ).scalar_one()
        ids = {}
        for step, state in states.items():
            ids[step] = session.execute(
                insert(DELIVERIES)
                .values(
                    enrolment_id=enrolment_id,
                    step_key=step,
                    state=state,
                    due_at=NOW,
                    attempts=0,
                    created_at=NOW,
                    updated_at=NOW,
                )
                .returning(DELIVERIES.c.id)
            ).scalar_one()
    return ids


def test_unsubscribing_ends_every_enrolment_and_skips_every_unsent_email_claimed_ones_too(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip)
    ana = patient(engine)
    with db.transaction(engine) as session:
        [claimed] = claim_due(session, now=NOW, limit=10, lease=LEASE)
    other = second_campaign(engine, ana.id, a="retry", b="sending", c="sent", d="scheduled")
    before = deliveries(engine)
    done = run(engine, settings, token(engine))
    assert done == Unsubscribed(
        patient_id=ana.id,
        already=False,
        ended_enrolments=2,
        skipped=len(before) - 2,  # all but the one sending and the one sent
        in_flight=1,
        campaigns=("ketamine-onboarding", "other"),
    )
    after = deliveries(engine)
    assert before[claimed][0] == "claimed" and after[claimed] == ("skipped", "unsubscribed")
    assert after[other["b"]] == before[other["b"]] == ("sending", None)  # beyond recall
    assert after[other["c"]] == ("sent", None)
    unsent = set(after) - {other["b"], other["c"]}
    assert {after[i] for i in unsent} == {("skipped", "unsubscribed")}
    with db.transaction(engine) as session:
        enrolments = session.scalars(select(Enrolment)).all()
        kinds = [e.kind for e in session.scalars(select(Event))]
        entry = suppression.find_entry(session, settings.secret_keys, ANA)
    assert {(e.status, e.ended_reason) for e in enrolments} == {("ended", "unsubscribed")}
    assert patient(engine).unsubscribed_at == NOW == patient(engine).suppressed_at
    assert entry is not None and (entry.reason, entry.source) == ("unsubscribed", "one-click")
    assert kinds.count("patient.unsubscribed") == 1 and kinds.count("ended") == 2


def test_a_second_unsubscribe_is_already_and_changes_nothing(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip)
    first = run(engine, settings, token(engine))
    assert first is not None and not first.already
    before = snapshot(engine)
    again = run(engine, settings, token(engine), now=NOW + timedelta(days=1))
    assert again == Unsubscribed(first.patient_id, True, 0, 0, 0, ())
    assert snapshot(engine) == before


def test_a_tampered_truncated_or_unknown_token_names_no_patient_and_changes_nothing(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip, ANA, "ben@example.com")
    good = token(engine)
    before = snapshot(engine)
    public_id, signature = good.split(".")
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    for bad in (
        good[:-1],
        good[:30],
        public_id,
        f"{public_id}.{flipped}",
        good.upper(),
        make_token("some-other-key-0123456789abcdefghijkl", public_id),
        make_token(TEST_SECRET, new_public_id()),  # well signed, but nobody's
        token(engine, "ben@example.com")[:23] + signature,  # Ben's id, Ana's signature
        "",
        "../../etc/passwd",
        "1." + signature,
    ):
        assert run(engine, settings, bad) is None, bad
    assert snapshot(engine) == before


def test_a_token_holds_nothing_that_names_the_patient(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip, ANA, "ben@example.com")
    ana = patient(engine)
    made = token(engine)
    public_id, signature = made.split(".")
    assert public_id == ana.public_id and len(public_id) == len(signature) == 22
    decoded = b"".join(base64.urlsafe_b64decode(part + "==") for part in (public_id, signature))
    for revealing in (ANA, "example", "Zoë"):
        assert revealing not in made and revealing.encode() not in decoded
    # nothing but the random public id and its signature: not the row id, in any form
    assert made == make_token(TEST_SECRET, ana.public_id)
    assert read_token(TEST_SECRET, make_token(TEST_SECRET, str(ana.id).rjust(22, "0"))) is not None
    assert run(engine, settings, make_token(TEST_SECRET, str(ana.id).rjust(22, "0"))) is None
    assert public_id != patient(engine, "ben@example.com").public_id
    # the email carries exactly this link
    link = unsubscribe_url(settings.public_url, settings.secret_key, ana.public_id)
    result = drip("preview", "ketamine-onboarding", "welcome", "--email", ANA, "--format", "eml")
    assert result.exit_code == 0 and f"<{link}>" in result.stdout


def test_a_token_signed_with_a_rotated_out_key_still_unsubscribes(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip)
    old_link = token(engine, key=TEST_SECRET)  # in an email sent before the rotation
    rotated = ("a-brand-new-key-0123456789abcdefghijklmnop", TEST_SECRET)
    done = run(engine, settings, old_link, keys=rotated)
    assert done is not None and not done.already and done.skipped > 0
    assert run(engine, settings, old_link, keys=rotated[:1]) is None  # once the old key is gone
    with db.transaction(engine) as session:  # the entry is under the key that signs now…
        assert suppression.find_entry(session, rotated[:1], ANA) is not None
        assert suppression.find_entry(session, (TEST_SECRET,), ANA) is None
        assert suppression.find(session, rotated, ANA) is not None  # …and found under both


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_two_unsubscribes_at_once_on_postgresql_one_does_the_work_the_other_is_a_no_op(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip)
    link = token(engine)
    results: dict[str, Unsubscribed | None] = {}
    with db.transaction(engine) as first:
        results["first"] = unsubscribe(
            first, token=link, keys=settings.secret_keys, now=NOW, source="one-click"
        )
        second = threading.Thread(target=lambda: results.update(second=run(engine, settings, link)))
        second.start()  # its UPDATE waits for the first transaction's row lock
        wait_until(lambda: waiting_for_a_lock(engine), "the second unsubscribe to wait")
    second.join()
    first_done, second_done = results["first"], results["second"]
    assert first_done is not None and not first_done.already and first_done.skipped > 0
    assert second_done is not None and second_done.already
    with engine.connect() as c:
        kinds = list(c.scalars(select(EVENTS.c.kind)))
        assert c.scalar(select(func.count()).select_from(SUPPRESSIONS)) == 1
    assert kinds.count("patient.unsubscribed") == 1 and kinds.count("patient.suppressed") == 1



@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_resume_that_loaded_the_enrolment_before_an_unsubscribe_cannot_reopen_it(
    drip: Drip, engine: Engine, settings: Settings, env: dict[str, str]
) -> None:
    """`drip resume` reads the paused enrolment, the patient unsubscribes meanwhile (PostgreSQL,
    read committed): the resume must not write `active` back over `ended`."""
    from drip import enrolment
    from drip.cli import App

    enrol(drip)
    assert drip("pause", ANA).exit_code == 0
    link = token(engine)
    planner = App(environ=env).planner("ketamine-onboarding", NOW)
    done: dict[str, Unsubscribed | None] = {}
    with db.transaction(engine) as session:
        found = enrolment.find_patient(session, ANA)
        paused = enrolment.open_enrolment(session, found, None)
        unsubscribing = threading.Thread(target=lambda: done.update(u=run(engine, settings, link)))
        unsubscribing.start()
        wait_until(
            lambda: "u" in done or waiting_for_a_lock(engine), "the unsubscribe to end or wait"
        )
        enrolment.resume(session, paused, planner, found.timezone, actor="cli:test")
    unsubscribing.join()
    with engine.connect() as c:
        assert set(c.scalars(select(ENROLMENTS.c.status))) == {"ended"}
    assert {state for state, _ in deliveries(engine).values()} == {"skipped"}

def waiting_for_a_lock(engine: Engine) -> bool:
    with engine.connect() as c:
        return bool(
            c.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            )
        )
