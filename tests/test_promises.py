"""The engine's promises in the cases nobody planned (issue 8): late emails at send time, bursts,
a coordinator's change during a batch, a relay that swallows messages, poison rows, slow relays
and leases, the Message-ID of an unknown send. Real SMTP servers on loopback, real databases
(both kinds), the Sender driven directly (tests/test_pipeline.py runs the real worker)."""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import Engine, select, text, update

from drip import db
from drip.breaker import LocalBreaker, RedisBreaker
from drip.broker import broker, redis_client
from drip.claims import claim_due
from drip.clock import Clock
from drip.errors import UnknownOutcomeError
from drip.models import Delivery, Patient
from drip.sending import Sender
from drip.settings import Settings
from drip.transports import MemoryTransport, Transport, open_transport
from tests.smtp_servers import CapturingServer, ScriptedServer

Drip = Callable[..., Result]
NOW = datetime(2026, 10, 30, 14, 1, tzinfo=UTC)  # Fri 10:01 in New York
LEASE = timedelta(seconds=300)


def enrol(drip: Drip, *emails: str, first_session: str = "2026-11-09") -> None:
    for email in emails:
        result = drip(
            "enroll", email, "--campaign", "ketamine-onboarding", "--first-name", "Ann",
            "--first-session", first_session,
        )  # fmt: skip
        assert result.exit_code == 0, result.output


def claim(engine: Engine, now: datetime = NOW) -> list[int]:
    with db.transaction(engine) as session:
        return claim_due(session, now=now, limit=100, lease=LEASE)


def sender(
    engine: Engine, settings: Settings, transport: Transport, now: datetime = NOW, **kw: Any
) -> Sender:
    return Sender(engine, settings, transport, Clock(now), rng=random.Random(7), **kw)


def row(engine: Engine, delivery_id: int) -> Delivery:
    with db.transaction(engine) as session:
        found = session.get(Delivery, delivery_id)
        assert found is not None
        session.expunge(found)
        return found


def by_step(engine: Engine, step: str) -> list[int]:
    with engine.connect() as c:
        return list(c.scalars(select(Delivery.id).where(Delivery.step_key == step)))


@pytest.fixture
def capture() -> Iterator[CapturingServer]:
    with CapturingServer() as server:
        yield server


def test_a_step_past_its_age_is_skipped_at_send_time_not_sent_late(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    """Workers back after days away (or a long retry chain, or `drip retry`) must not send
    "Getting ready for your first visit" after the visit: its expiry is kept with the row."""
    enrol(drip, "ana@example.com")
    [before] = by_step(engine, "before-first-session")
    with engine.begin() as c:  # claimed while still useful: a batch then waited for two days
        c.execute(update(Delivery).where(Delivery.id == before).values(state="claimed"))
        expires = c.scalar(select(Delivery.expires_at).where(Delivery.id == before))
    assert expires is not None
    after_visit = expires + timedelta(hours=1)
    transport = MemoryTransport()
    report = sender(engine, settings, transport, after_visit).send_batch([before])
    assert report.skipped == 1 and transport.messages == []
    skipped = row(engine, before)
    assert skipped.state == "skipped" and skipped.last_error.startswith("stale")


def test_no_two_emails_to_one_patient_closer_than_the_minimum_gap(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip, "ana@example.com")
    [welcome], [plan] = by_step(engine, "welcome"), by_step(engine, "treatment-plan")
    transport = MemoryTransport()
    assert sender(engine, settings, transport).send_batch(claim(engine)).sent == 1
    # the next one fell due an hour later (a re-plan, a retry…): it waits for the gap's end
    soon = NOW + timedelta(hours=1)
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.id == plan).values(state="claimed", due_at=soon))
    report = sender(engine, settings, transport, soon).send_batch([plan])
    assert report.deferred == 1 and len(transport.messages) == 1
    waiting = row(engine, plan)
    sent_at = row(engine, welcome).sent_at
    assert waiting.state == "scheduled" and sent_at is not None
    assert waiting.due_at is not None and waiting.due_at >= sent_at + settings.min_gap


def test_overdue_emails_of_one_patient_in_one_batch_follow_each_other_at_the_gap(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip, "ana@example.com")
    ids = by_step(engine, "welcome") + by_step(engine, "treatment-plan")
    with engine.begin() as c:  # both claimed (by two tickers, say) and due now
        c.execute(
            update(Delivery).where(Delivery.id.in_(ids)).values(state="claimed", due_at=NOW)
        )
    transport = MemoryTransport()
    report = sender(engine, settings, transport).send_batch(ids)
    assert (report.sent, report.deferred) == (1, 1)
    second = row(engine, ids[1])
    assert second.due_at is not None and second.due_at >= NOW + settings.min_gap


class _ChangesMidBatch(Transport):
    """A real SMTP connection; while the first message is on its way (after its envelope, before
    its body), a coordinator changes the plans of the other patients of the batch."""

    def __init__(self, inner: Transport, change: Callable[[], None]) -> None:
        self.inner, self.change, self.calls = inner, change, 0

    def send(self, envelope_from: str, recipient: str, message: bytes, **hooks: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            self.change()
        self.inner.send(envelope_from, recipient, message, **hooks)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> _ChangesMidBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_pause_unenroll_and_reschedule_win_over_a_batch_in_flight(
    drip: Drip, engine: Engine, settings: Settings, capture: CapturingServer
) -> None:
    enrol(drip, "a@example.com", "b@example.com", "c@example.com", "d@example.com")
    ids = claim(engine)
    assert len(ids) == 4
    said: list[str] = []

    def coordinator() -> None:
        for args in (
            ("pause", "b@example.com"),
            ("unenroll", "c@example.com"),
            ("reschedule", "d@example.com", "--first-session", "2026-11-20"),
        ):
            result = drip(*args)
            assert result.exit_code == 0, result.output
            said.append(result.output)

    smtp = open_transport(f"smtp://127.0.0.1:{capture.port}", timeout=5)
    with _ChangesMidBatch(smtp, coordinator) as transport:
        report = sender(engine, settings, transport).send_batch(ids)
    assert report.sent == 1 and len(capture.wait_for(1)) == 1
    assert capture.messages[0].rcpt_tos == ("a@example.com",)
    assert [row(engine, i).state for i in ids[1:]] == ["scheduled", "cancelled", "scheduled"]


def test_a_change_of_plan_says_when_an_email_was_already_on_its_way(
    drip: Drip, engine: Engine
) -> None:
    enrol(drip, "a@example.com")
    [welcome] = claim(engine)
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.id == welcome).values(state="sending"))
    result = drip("pause", "a@example.com")
    assert result.exit_code == 0 and "1 email was already on its way" in result.output
    result = drip("unenroll", "a@example.com")
    assert "already on its way" in result.output and row(engine, welcome).state == "sending"


def test_one_unknown_outcome_stops_the_batch_and_opens_the_breaker(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    """A relay that hangs or drops the connection after the body (a wedged content filter) costs
    one `unknown`, not a backlog: the rest go back untried, and sending pauses for every
    process sharing the breaker."""
    enrol(drip, *(f"p{i}@example.com" for i in range(5)))
    ids = claim(engine)
    breaker = LocalBreaker()
    with ScriptedServer({".": ["DROP"] * 10}) as server:
        smtp = open_transport(f"smtp://127.0.0.1:{server.port}", timeout=5)
        with smtp as transport:
            report = sender(engine, settings, transport, breaker=breaker).send_batch(ids)
            assert (report.unknown, report.given_back, report.sent) == (1, 4, 0)
            assert len(server.bodies) == 1
            assert breaker.open_for() > 0
            [lost] = [i for i in ids if row(engine, i).state == "unknown"]
            rest = [i for i in ids if i != lost]
            # another batch while the breaker is open sends nothing at all
            later = NOW + timedelta(seconds=1)
            with engine.begin() as c:
                again_claimed = update(Delivery).where(Delivery.id.in_(rest))
                c.execute(again_claimed.values(state="claimed", due_at=later))
            again = sender(engine, settings, transport, later, breaker=breaker).send_batch(ids)
            assert again.given_back == 4 and len(server.bodies) == 1
    waiting = [row(engine, i) for i in rest]  # back untried, due when the breaker closes
    assert all(d.state == "scheduled" and d.attempts == 0 and d.due_at > later for d in waiting)
    assert all("outcome" in (d.last_error or "") for d in waiting)


def test_the_breaker_is_shared_through_redis(tmp_path: Path) -> None:
    with broker(None, tmp_path) as url:
        client = redis_client(url)
        one = RedisBreaker(client, "smtp://relay.example:587")
        other = RedisBreaker(redis_client(url), "smtp://relay.example:587")
        assert other.open_for() == 0
        assert one.trip() == 60
        assert 0 < other.open_for() <= 60
        assert other.trip() == 120  # the second trip in a row waits longer
        keys = [k.decode() for k in client.keys("*")]
        assert keys and all(k.startswith("drip:breaker:") for k in keys)
        assert not any("relay.example" in k for k in keys)


class _HangsAfterMark(MemoryTransport):
    def send(self, envelope_from: str, recipient: str, message: bytes, **hooks: Any) -> None:
        hooks["before_content"]()
        raise UnknownOutcomeError("connection lost after the body")


def test_an_unknown_row_keeps_its_message_id_and_a_retry_sends_the_same_one(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip, "ana@example.com")
    [welcome] = claim(engine)
    sender(engine, settings, _HangsAfterMark()).send_batch([welcome])
    unknown = row(engine, welcome)
    assert unknown.state == "unknown" and unknown.message_id  # for the relay's logs
    assert drip("retry", str(welcome)).exit_code == 0
    later = NOW + timedelta(minutes=1)
    transport = MemoryTransport()
    assert sender(engine, settings, transport, later).send_batch(claim(engine, later)).sent == 1
    sent = BytesParser().parsebytes(transport.messages[0][-1])
    assert sent["Message-ID"] == unknown.message_id == row(engine, welcome).message_id


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda p: p.write_bytes(b"\xff\xfe not utf-8 {{ x }}"), id="not-utf8"),
        pytest.param(
            lambda p: p.write_text("{% extends '_layout.txt.j2' %}{% block content %}"
                                   "{{ 1 / 0 }}{% endblock %}"),
            id="zero-division",
        ),
    ],
)  # fmt: skip
def test_a_message_that_cannot_be_built_fails_its_row_and_the_batch_goes_on(
    drip: Drip, engine: Engine, settings: Settings, tmp_path: Path, breakage: Any
) -> None:
    """No poison rows: any exception while building one email (not only drip's own errors)
    fails that row with its reason, and the other rows of the batch are sent."""
    enrol(drip, "ana@example.com")
    ids = by_step(engine, "welcome") + by_step(engine, "treatment-plan")
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.id == ids[1]).values(enrolment_id=1))
    templates = tmp_path / "templates"
    shutil.copytree(settings.templates_dir, templates)
    breakage(templates / "ketamine-onboarding" / "welcome.txt.j2")
    enrol(drip, "ben@example.com")
    ids = claim(engine)
    assert len(ids) == 2  # both welcomes
    transport = MemoryTransport()
    report = sender(engine, replace(settings, templates_dir=templates), transport).send_batch(ids)
    assert report.failed == 2 and transport.messages == []
    assert all(row(engine, i).last_error.startswith("render:") for i in ids)
    # the other steps of the campaign still go
    later = NOW + timedelta(days=1, hours=1)
    next_ids = claim(engine, later)
    assert next_ids and sender(engine, settings, transport, later).send_batch(next_ids).sent


class _SlowRelay(MemoryTransport):
    """A relay that takes 3 s per message, on a clock the test controls."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def send(self, envelope_from: str, recipient: str, message: bytes, **hooks: Any) -> None:
        self.seconds += 3
        super().send(envelope_from, recipient, message, **hooks)

    def monotonic(self) -> float:
        return self.seconds


def test_a_slow_relay_cuts_the_batch_at_its_deadline_and_turns_nothing_unknown(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip, *(f"p{i}@example.com" for i in range(12)))
    ids = claim(engine)
    short = replace(settings, lease_seconds=20)  # soft deadline: 20 - 1 s
    relay = _SlowRelay()
    report = sender(engine, short, relay, monotonic=relay.monotonic).send_batch(ids)
    assert report.sent == 7 and report.given_back == 5 and report.unknown == 0
    states = [row(engine, i).state for i in ids]
    assert states.count("sent") == 7 and states.count("scheduled") == 5
    assert all(row(engine, i).lease_until is None for i in ids)


def test_a_long_batch_renews_the_lease_of_the_rows_it_still_holds(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip, *(f"p{i}@example.com" for i in range(6)))
    lease = timedelta(seconds=40)  # renewed every 10 s of the batch
    with db.transaction(engine) as session:
        ids = claim_due(session, now=NOW, limit=100, lease=lease)
    leases: list[datetime] = []

    class _Watching(_SlowRelay):
        def send(self, *args: Any, **hooks: Any) -> None:
            with engine.connect() as c:
                leases.extend(
                    c.scalars(select(Delivery.lease_until).where(Delivery.state == "claimed"))
                )
            super().send(*args, **hooks)

    relay = _Watching()

    class _RelayClock:  # the calendar moves with the relay's slowness
        def now(self) -> datetime:
            return NOW + timedelta(seconds=relay.seconds)

    long_lease = replace(settings, lease_seconds=40)
    Sender(engine, long_lease, relay, _RelayClock(), monotonic=relay.monotonic).send_batch(ids)  # type: ignore[arg-type]
    assert max(leases) > NOW + lease  # a row still waiting was given more time


def test_a_sent_outcome_that_changes_no_row_is_a_warning_with_the_delivery_id(
    drip: Drip, engine: Engine, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    enrol(drip, "a@example.com", "b@example.com")
    ids = claim(engine)

    lost: list[int] = []

    class _LosesTheFirst(MemoryTransport):
        def send(self, envelope_from: str, recipient: str, message: bytes, **hooks: Any) -> None:
            super().send(envelope_from, recipient, message, **hooks)
            if not lost:  # a ticker took the row back meanwhile
                lost.append(int(BytesParser().parsebytes(message)["X-Drip-Delivery"]))
                with engine.begin() as c:
                    lose = update(Delivery).where(Delivery.id == lost[0])
                    c.execute(lose.values(state="unknown"))

    with caplog.at_level(logging.WARNING, logger="drip.sending"):
        sender(engine, settings, _LosesTheFirst()).send_batch(ids)
    assert any(f"delivery {lost[0]}" in r.getMessage() and "not recorded" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_a_retry_row_deferred_by_the_window_stays_a_retry(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip, "a@example.com")
    [welcome] = claim(engine)
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.id == welcome).values(attempts=2))
    closed = datetime(2026, 10, 30, 23, 30, tzinfo=UTC)  # 19:30 in New York
    assert sender(engine, settings, MemoryTransport(), closed).send_batch([welcome]).deferred == 1
    assert row(engine, welcome).state == "retry"


def test_a_patient_unsubscribed_after_the_claim_gets_nothing_even_from_the_fast_path(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    """The claimed → sending statement itself re-checks the patient (not only the batch's load)."""
    enrol(drip, "a@example.com", "b@example.com")
    ids = claim(engine)

    class _UnsubscribesB(MemoryTransport):
        def send(self, envelope_from: str, recipient: str, message: bytes, **hooks: Any) -> None:
            if not self.messages:
                with engine.begin() as c:
                    c.execute(update(Patient).where(Patient.id == 2).values(unsubscribed_at=NOW))
            super().send(envelope_from, recipient, message, **hooks)

    transport = _UnsubscribesB()
    report = sender(engine, settings, transport).send_batch(ids)
    assert report.sent == 1 and report.not_ours == 1 and len(transport.messages) == 1


def test_drip_retry_refuses_a_step_past_its_age(drip: Drip, engine: Engine) -> None:
    """Found in review: `drip retry` dropped the step's expiry, so a failed "before your first
    visit" email was sent a day after the visit."""
    enrol(drip, "ana@example.com")
    [before] = by_step(engine, "before-first-session")
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.id == before).values(state="failed"))
        expires = c.scalar(select(Delivery.expires_at).where(Delivery.id == before))
    late = (expires + timedelta(hours=1)).isoformat()
    result = drip("retry", str(before), env={"DRIP_NOW": late})
    assert result.exit_code == 1 and "past its age" in result.output
    assert row(engine, before).state == "failed"
    result = drip("retry", str(before))  # before its age: retried, and it keeps its expiry
    assert result.exit_code == 0 and row(engine, before).expires_at == expires


def test_a_batch_that_waited_in_redis_renews_its_lease_when_it_starts(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    enrol(drip, "a@example.com", "b@example.com")
    ids = claim(engine)  # leases until NOW + 300 s
    started = NOW + timedelta(seconds=290)
    leases: list[datetime] = []

    class _Watching(MemoryTransport):
        def send(self, *args: Any, **hooks: Any) -> None:
            with engine.connect() as c:
                leases.extend(
                    c.scalars(select(Delivery.lease_until).where(Delivery.state == "claimed"))
                )
            super().send(*args, **hooks)

    sender(engine, settings, _Watching(), started).send_batch(ids)
    assert leases and min(leases) >= started + LEASE


def test_a_breaker_opened_by_another_batch_stops_this_one_too(
    drip: Drip, engine: Engine, settings: Settings
) -> None:
    """Every running batch, not only new ones, stops sending to a relay that swallows mail."""
    enrol(drip, *(f"p{i}@example.com" for i in range(4)))
    ids = claim(engine)
    breaker = LocalBreaker()

    class _OtherBatchTrips(_SlowRelay):  # while this batch sends, another one loses a message
        def send(self, *args: Any, **hooks: Any) -> None:
            super().send(*args, **hooks)
            if len(self.messages) == 1:
                breaker.trip()

    relay = _OtherBatchTrips()
    report = sender(engine, settings, relay, breaker=breaker, monotonic=relay.monotonic).send_batch(
        ids
    )
    assert report.sent == 1 and report.given_back == 3 and report.unknown == 0
    assert [row(engine, i).state for i in ids].count("scheduled") == 3


def test_a_patients_expiring_step_is_claimed_before_one_that_can_wait(
    drip: Drip, engine: Engine
) -> None:
    enrol(drip, "ana@example.com")
    [welcome], [before] = by_step(engine, "welcome"), by_step(engine, "before-first-session")
    with engine.begin() as c:  # workers were down: both are due, one of them soon useless
        c.execute(update(Delivery).where(Delivery.id.in_([welcome, before])).values(due_at=NOW))
    assert claim(engine) == [before]


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_two_tickers_at_once_never_claim_two_rows_of_one_patient(
    drip: Drip, engine: Engine
) -> None:
    """Found in review: SKIP LOCKED skips the row another ticker holds, not its patient, so a
    second ticker claimed the patient's next row and both were sent in the same second."""
    import threading

    enrol(drip, "ana@example.com")
    with engine.begin() as c:
        c.execute(update(Delivery).values(due_at=NOW))  # all eight due
    first = db.session_factory(engine)()
    first.begin()
    held = claim_due(first, now=NOW, limit=1, lease=LEASE)  # not committed yet
    assert len(held) == 1
    second: list[list[int]] = []
    thread = threading.Thread(target=lambda: second.append(claim(engine)))
    thread.start()
    with engine.connect() as c:  # wait until the second ticker waits for the patient
        for _ in range(600):
            waiting = c.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"  # not another test process's waits
                )
            ).scalar()
            if waiting or not thread.is_alive():
                break
            thread.join(0.05)
    first.commit()
    first.close()
    thread.join(30)
    assert second == [[]]
