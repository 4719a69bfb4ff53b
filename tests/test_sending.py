"""Sending a claimed batch against real SMTP servers on loopback and a real database.

The Sender is driven directly (no Celery here: tests/test_pipeline.py runs the real worker), with
scripted servers for the replies a real server will not give on cue.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import Engine, select, update

from drip import db, suppression
from drip.breaker import LocalBreaker
from drip.claims import claim_due
from drip.clock import Clock
from drip.errors import TransientDeliveryError
from drip.models import Delivery, Enrolment, Event, Patient
from drip.ratelimit import LocalLimiter
from drip.sending import BACKOFF_BASE, BACKOFF_CAP, Sender, backoff
from drip.settings import Settings
from drip.states import leave
from drip.transports import MemoryTransport, Transport, open_transport
from tests.smtp_servers import CapturingServer, ScriptedServer, self_signed_tls

Drip = Callable[..., Result]
NOW = datetime(2026, 10, 30, 14, 1, tzinfo=UTC)  # Fri 10:01 in New York
LEASE = timedelta(seconds=300)


@pytest.fixture
def enrolled(drip: Drip) -> Callable[..., None]:
    def enrol(*emails: str) -> None:
        for email in emails or ("ana@example.com",):
            result = drip(
                "enroll",
                email,
                "--campaign",
                "ketamine-onboarding",
                "--first-name",
                "Zoë",
                "--last-name",
                "O'Brien",
                "--first-session",
                "2026-11-09",
            )
            assert result.exit_code == 0, result.output

    return enrol


_started: list[datetime] = []


@pytest.fixture(autouse=True)
def _real_start() -> None:
    """When this test began, in real time (see ran)."""
    _started[:] = [datetime.now(UTC)]


def ran() -> timedelta:
    """Real time since this test began: how far a Clock started at NOW during it can have run on,
    however slow the machine."""
    return datetime.now(UTC) - _started[0]


def near(value: datetime | None, expected: datetime) -> bool:
    """Recorded by a Clock started at `expected` during this test, which runs on at real speed."""
    return value is not None and expected <= value <= expected + ran()


def claim(engine: Engine, now: datetime = NOW) -> list[int]:
    with db.transaction(engine) as session:
        return claim_due(session, now=now, limit=100, lease=LEASE)


def sender(engine: Engine, settings: Settings, transport: Transport, now: datetime = NOW) -> Sender:
    return Sender(engine, settings, transport, Clock(now), rng=random.Random(7))


def rows(engine: Engine) -> dict[int, Delivery]:
    with db.transaction(engine) as session:
        return {d.id: d for d in session.scalars(select(Delivery))}


def smtp(port: int) -> Transport:
    return open_transport(f"smtp://127.0.0.1:{port}", timeout=30)  # only stops a hang


@pytest.fixture
def capture() -> Iterator[CapturingServer]:
    with CapturingServer() as server:
        yield server


def test_a_batch_is_sent_once_and_recorded_with_its_message_id(
    enrolled: Callable[..., None], engine: Engine, settings: Settings, capture: CapturingServer
) -> None:
    enrolled("ana@example.com", "ben@example.com")
    ids = claim(engine)
    with smtp(capture.port) as transport:
        report = sender(engine, settings, transport).send_batch(ids)
        assert report.sent == 2
        assert sender(engine, settings, transport).send_batch(ids).sent == 0  # a second copy
    messages = capture.wait_for(2)
    assert len(messages) == 2 and capture.connections == 1
    recorded = rows(engine)
    for message in messages:
        parsed = BytesParser(policy=policy.default).parsebytes(message.data)
        delivery = recorded[int(parsed["X-Drip-Delivery"])]
        assert delivery.state == "sent" and delivery.attempts == 1
        assert delivery.message_id == parsed["Message-ID"] and near(delivery.sent_at, NOW)
        assert message.rcpt_tos == (parsed["To"],)
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert "/unsubscribe/" in parsed["List-Unsubscribe"]


def test_nobody_gets_an_email_after_being_unsubscribed_paused_or_unenrolled_since_the_claim(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled("a@example.com", "b@example.com", "c@example.com", "d@example.com")
    ids = claim(engine)
    with engine.begin() as c:
        c.execute(update(Patient).where(Patient.id == 1).values(unsubscribed_at=NOW))
        c.execute(update(Enrolment).where(Enrolment.id == 2).values(status="paused"))
        c.execute(update(Enrolment).where(Enrolment.id == 3).values(status="ended"))
        c.execute(
            update(Patient)
            .where(Patient.id == 4)
            .values(suppressed_at=NOW, suppressed_reason="bounce 5.1.1")
        )
    transport = MemoryTransport()
    report = sender(engine, settings, transport).send_batch(ids)
    assert transport.messages == []
    assert (report.skipped, report.deferred, report.sent) == (3, 1, 0)
    states = {d.enrolment_id: (d.state, d.last_error) for d in rows(engine).values() if d.id in ids}
    assert states[1] == ("skipped", "unsubscribed")
    assert states[2] == ("scheduled", None)  # waits for `drip resume`
    assert states[3] == ("skipped", "enrolment ended")
    assert states[4] == ("skipped", "suppressed: bounce 5.1.1")


def test_outside_the_send_window_a_row_is_planned_for_the_next_opening(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled()
    ids = claim(engine)
    late = datetime(2026, 10, 30, 23, 30, tzinfo=UTC)  # 19:30 in New York: closed
    transport = MemoryTransport()
    assert sender(engine, settings, transport, late).send_batch(ids).deferred == 1
    assert transport.messages == []
    delivery = rows(engine)[ids[0]]
    assert delivery.state == "scheduled"
    assert delivery.due_at == datetime(2026, 10, 31, 13, 0, tzinfo=UTC)  # Sat 09:00 EDT


def test_451_then_250_retries_with_backoff_and_then_sends(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled()
    [delivery_id] = claim(engine)
    with ScriptedServer({"RCPT": ["451 4.3.0 try again later"]}) as server:
        with smtp(server.port) as transport:
            assert sender(engine, settings, transport).send_batch([delivery_id]).retry == 1
            first = rows(engine)[delivery_id]
            assert first.state == "retry" and first.attempts == 1 and "451" in first.last_error
            assert NOW <= first.due_at <= NOW + BACKOFF_BASE + ran()
            assert claim(engine, NOW) == []  # not before its back-off
            later = first.due_at + timedelta(seconds=1)
            assert claim(engine, later) == [delivery_id]
            assert sender(engine, settings, transport, later).send_batch([delivery_id]).sent == 1
        assert len(server.bodies) == 1
    second = rows(engine)[delivery_id]
    assert second.state == "sent" and second.attempts == 2 and second.last_error is None


def test_550_511_fails_the_row_and_suppresses_the_address(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled()
    [delivery_id] = claim(engine)
    with ScriptedServer({"RCPT": ["550 5.1.1 <ana@example.com>: no such user"]}) as server:
        with smtp(server.port) as transport:
            assert sender(engine, settings, transport).send_batch([delivery_id]).failed == 1
    failed = rows(engine)[delivery_id]
    assert failed.state == "failed" and "5.1.1" in failed.last_error
    assert "ana@example.com" not in failed.last_error  # addresses stay out of the database log
    with engine.connect() as c:
        patient = c.execute(select(Patient)).one()
        kinds = list(c.scalars(select(Event.kind)))
    assert near(patient.suppressed_at, NOW) and "5.1.1" in patient.suppressed_reason
    assert "patient.suppressed" in kinds and "delivery.failed" in kinds
    # on the list, and every other email of the patient is skipped at once, in every campaign
    with db.transaction(engine) as session:
        entry = suppression.find_entry(session, settings.secret_keys, "ANA@example.com")
        enrolment = session.scalars(select(Enrolment)).one()
    assert entry is not None and (entry.reason, entry.source) == ("bounce 5.1.1", "bounce")
    assert (enrolment.status, enrolment.ended_reason) == ("ended", "suppressed")
    others = [row for i, row in rows(engine).items() if i != delivery_id]
    assert others and {(r.state, r.last_error) for r in others} == {
        ("skipped", "suppressed: bounce 5.1.1")
    }
    assert claim(engine, NOW + timedelta(days=30)) == []


def test_a_5xx_that_is_not_about_the_mailbox_fails_without_suppressing(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled()
    ids = claim(engine)
    with ScriptedServer({".": ["554 5.7.1 message refused"]}) as server:
        with smtp(server.port) as transport:
            assert sender(engine, settings, transport).send_batch(ids).failed == 1
    with engine.connect() as c:
        assert c.scalar(select(Patient.suppressed_at)) is None


def test_421_at_greeting_retries_and_the_rest_of_the_batch_waits(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled("a@example.com", "b@example.com", "c@example.com", "d@example.com")
    ids = claim(engine)
    closing = ["421 4.3.2 shutting down"] * 10
    with ScriptedServer({"CONNECT": closing}) as server:
        with smtp(server.port) as transport:
            report = sender(engine, settings, transport).send_batch(ids)
    assert (report.retry, report.given_back, report.sent) == (2, 2, 0)
    after = [rows(engine)[i] for i in ids]
    assert all(d.state == "retry" and d.due_at > NOW for d in after)
    # two were attempted; the other two were not tried against a failing server, and being
    # given back counts as a try too (so no row goes round for ever), with the true reason
    assert [d.attempts for d in after] == [1, 1, 1, 1]
    assert all("421" in d.last_error for d in after)
    assert sum("not attempted: the mail server was failing" in d.last_error for d in after) == 2


def test_a_connection_dropped_after_data_is_unknown_and_never_resent(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled()
    ids = claim(engine)
    with ScriptedServer({".": ["DROP"]}) as server:
        with smtp(server.port) as transport:
            assert sender(engine, settings, transport).send_batch(ids).unknown == 1
    delivery = rows(engine)[ids[0]]
    assert delivery.state == "unknown" and delivery.attempts == 1
    with db.transaction(engine) as session:
        later = claim_due(session, now=NOW + timedelta(days=90), limit=1000, lease=LEASE)
    assert ids[0] not in later


def test_transient_failures_are_retried_for_drip_retry_for_then_fail(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    """An outage of an hour must not lose mail: retries go on for DRIP_RETRY_FOR (3 days by
    default) from the first try, whatever the number of attempts, then the row fails."""
    enrolled()
    [delivery_id] = claim(engine)
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.id == delivery_id).values(attempts=20))
    failing = [TransientDeliveryError("451 4.4.1 timeout")]
    report = sender(engine, settings, MemoryTransport(failing)).send_batch([delivery_id])
    assert report.retry == 1 and rows(engine)[delivery_id].state == "retry"  # 21 tries, 0 days
    with engine.begin() as c:  # first tried more than DRIP_RETRY_FOR ago
        c.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id)
            .values(state="claimed", first_tried_at=NOW - settings.retry_for)
        )
    report = sender(engine, settings, MemoryTransport(failing)).send_batch([delivery_id])
    delivery = rows(engine)[delivery_id]
    assert report.failed == 1 and delivery.state == "failed" and delivery.attempts == 22
    assert "gave up after 22 tries over 3.0 days: 451 4.4.1 timeout" in delivery.last_error


@pytest.mark.parametrize("attempts", [1, 2, 3, 5, 8, 20])
def test_backoff_is_full_jitter_under_an_exponential_cap(attempts: int) -> None:
    rng = random.Random(attempts)
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempts - 1))
    delays = [backoff(attempts, rng) for _ in range(500)]
    assert all(timedelta(0) <= d <= ceiling for d in delays)
    assert max(delays) > ceiling * 0.9 and min(delays) < ceiling * 0.1  # spread over the range


def test_a_broken_template_fails_the_row_and_sends_nothing(
    enrolled: Callable[..., None], engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    enrolled()
    ids = claim(engine)
    templates = tmp_path / "templates"
    shutil.copytree(settings.templates_dir, templates)
    (templates / "ketamine-onboarding" / "welcome.txt.j2").write_text(
        "{% extends '_layout.txt.j2' %}{% block content %}{{ favourite_colour }}{% endblock %}"
    )
    broken = replace(settings, templates_dir=templates)
    transport = MemoryTransport()
    assert sender(engine, broken, transport).send_batch(ids).failed == 1
    assert transport.messages == []
    delivery = rows(engine)[ids[0]]
    assert delivery.state == "failed" and delivery.last_error.startswith("render:")
    assert "welcome.txt.j2" in delivery.last_error


def test_ids_that_are_no_longer_claimed_are_left_alone(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled()
    ids = claim(engine)
    with engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.id == ids[0]).values(state="cancelled"))
    transport = MemoryTransport()
    report = sender(engine, settings, transport).send_batch([*ids, 999_999])
    assert report.not_ours == 2 and transport.messages == []
    assert rows(engine)[ids[0]].state == "cancelled"


def test_a_reason_longer_than_the_column_is_stored_cut_not_refused(
    enrolled: Callable[..., None], engine: Engine
) -> None:
    """A broken campaign's error can be any length; PostgreSQL would refuse it whole (and with it
    the batch's last commit), so every reason is cut to the 500 characters last_error holds."""
    enrolled()
    ids = claim(engine)
    reason = "render: " + "x" * 600
    with engine.begin() as c:
        assert leave(c, ids, "claimed", "failed", now=NOW, error=reason) == 1
    delivery = rows(engine)[ids[0]]
    assert delivery.state == "failed" and delivery.lease_until is None
    assert delivery.last_error == reason[:500]


class _TakenMeanwhile(MemoryTransport):
    """Before the second message's content may go out, another copy of the task takes its row
    (as if the lease had run out and the row had been claimed again)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine, self.calls = engine, 0

    def send(self, envelope_from: str, recipient: str, message: bytes, **hooks: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            delivery = int(BytesParser().parsebytes(message)["X-Drip-Delivery"])
            with self.engine.begin() as c:
                c.execute(update(Delivery).where(Delivery.id == delivery).values(state="scheduled"))
        super().send(envelope_from, recipient, message, **hooks)


def test_a_row_taken_between_loading_and_sending_is_not_sent(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled("ana@example.com", "ben@example.com", "cy@example.com")
    ids = claim(engine)
    transport = _TakenMeanwhile(engine)
    report = sender(engine, settings, transport).send_batch(ids)
    assert (report.sent, report.not_ours) == (2, 1) and len(transport.messages) == 2
    states = sorted(d.state for d in rows(engine).values() if d.id in ids)
    assert states == ["scheduled", "sent", "sent"]


def test_a_failure_before_the_transport_could_mark_the_row_still_records_an_attempt(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled()
    ids = claim(engine)
    transport = MemoryTransport([TransientDeliveryError("connection refused")])
    report = sender(engine, settings, transport).send_batch(ids)
    delivery = rows(engine)[ids[0]]
    assert report.retry == 1 and delivery.state == "retry" and delivery.attempts == 1


def test_an_address_that_would_break_the_headers_fails_its_row_alone_naming_the_delivery(
    enrolled: Callable[..., None],
    engine: Engine,
    settings: Settings,
    capture: CapturingServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A value that reached the database some other way (an import, a hand edit) is refused
    when the message is built: never stripped and sent, never a traceback, never the address
    in a log line; the other rows of the batch go out."""
    enrolled("ana@example.com", "ben@example.com")
    injected = "ana.secret@example.com\r\nBcc: all@evil.example"
    with engine.begin() as c:
        c.execute(update(Patient).where(Patient.email == "ana@example.com").values(email=injected))
    ids = claim(engine)
    with caplog.at_level("DEBUG"), smtp(capture.port) as transport:
        report = sender(engine, settings, transport).send_batch(ids)
    assert (report.sent, report.failed) == (1, 1)
    (message,) = capture.wait_for(1)
    assert message.rcpt_tos == ("ben@example.com",) and b"evil" not in message.data
    [broken] = [d for d in rows(engine).values() if d.state == "failed"]
    assert "To header" in broken.last_error and "U+000D (CARRIAGE RETURN)" in broken.last_error
    assert "secret" not in broken.last_error and "evil" not in broken.last_error
    logged = [r.getMessage() for r in caplog.records]
    assert any(f"delivery {broken.id} failed" in line for line in logged)
    assert not any("secret" in line or "evil" in line for line in logged)
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("relay", ["self-signed", "no STARTTLS"])
def test_a_relay_that_cannot_be_used_as_configured_holds_the_batch_and_opens_the_breaker(
    enrolled: Callable[..., None], engine: Engine, settings: Settings, tmp_path: Path, relay: str
) -> None:
    """A certificate that does not verify, or no STARTTLS under tls=required, is an operator's
    mistake, not a patient's: no row is tried, retried or failed for it; the whole batch goes
    back untried, due when the circuit breaker (shared by every worker) closes."""
    pytest.importorskip("cryptography")
    enrolled("a@example.com", "b@example.com", "c@example.com")
    ids = claim(engine)
    server_context, _ = self_signed_tls(tmp_path)
    breaker = LocalBreaker()
    if relay == "self-signed":
        server, options = CapturingServer(tls_context=server_context), ""
    else:
        server, options = CapturingServer(), "?tls=required"
    with server, open_transport(f"smtp://127.0.0.1:{server.port}{options}", timeout=30) as smtp:
        report = Sender(
            engine, settings, smtp, Clock(NOW), rng=random.Random(7), breaker=breaker
        ).send_batch(ids)
        assert "MAIL" not in server.verbs() and server.messages == []
    assert (report.given_back, report.retry, report.failed, report.sent) == (3, 0, 0, 0)
    assert breaker.open_for() > 0
    after = [rows(engine)[i] for i in ids]
    assert all(d.state == "scheduled" and d.attempts == 0 and d.due_at > NOW for d in after)
    assert all("cannot be used as configured" in d.last_error for d in after)


# --- DRIP_RATE_LIMIT, DRIP_DAILY_LIMIT ------------------------------------------------------------


class FakeTime:
    """The batch's monotonic clock and sleep, moved only by its own sleeps; the limiter and
    the calendar read it too, so nothing here depends on the speed of the machine."""

    def __init__(self) -> None:
        self.t, self.slept = 1000.0, 0.0
        self.during: Callable[[], None] = lambda: None

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        self.slept += seconds
        self.during()


class FakeCalendar(Clock):
    def __init__(self, fake: FakeTime) -> None:
        super().__init__(NOW)
        self.fake = fake

    def now(self) -> datetime:
        return NOW + timedelta(seconds=self.fake.t - 1000.0)


class TimedTransport(MemoryTransport):
    """Notes the fake instant of each send."""

    def __init__(self, fake: FakeTime) -> None:
        super().__init__()
        self.fake, self.at = fake, []

    def send(self, envelope_from: str, recipient: str, message: bytes, **hooks: Any) -> None:
        super().send(envelope_from, recipient, message, **hooks)
        self.at.append(self.fake.t)


def limited(
    engine: Engine, settings: Settings, fake: FakeTime, limiter: LocalLimiter, transport: Transport
) -> Sender:
    return Sender(
        engine,
        settings,
        transport,
        FakeCalendar(fake),
        rng=random.Random(7),
        limiter=limiter,
        monotonic=fake.monotonic,
        sleep=fake.sleep,
    )


def test_under_drip_rate_limit_each_email_waits_for_its_turn_and_waiting_is_not_a_try(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled(*(f"p{i}@example.com" for i in range(6)))
    ids = claim(engine)
    fake = FakeTime()
    transport = TimedTransport(fake)
    waited: list[float] = []
    in_the_air: list[int] = []

    def look() -> None:  # while a batch waits, the email it sent before is already `sent`
        with engine.connect() as c:
            in_the_air.extend(c.scalars(select(Delivery.id).where(Delivery.state == "sending")))

    fake.during = look
    sender = limited(
        engine, settings, fake, LocalLimiter(rate=2.0, clock=fake.monotonic), transport
    )
    sender.on_wait = waited.append
    report = sender.send_batch(ids)
    assert report.sent == 6 and in_the_air == []
    gaps = [b - a for a, b in zip(transport.at, transport.at[1:], strict=False)]
    assert min(gaps) >= 0.5 - 1e-9  # one email every half second, never two at once
    assert report.waited_ms == round(fake.slept * 1000) and sum(waited) == pytest.approx(fake.slept)
    assert {(d.state, d.attempts) for d in rows(engine).values() if d.id in ids} == {("sent", 1)}


def test_a_daily_limit_reached_gives_the_rest_back_untried_as_they_were(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled(*(f"p{i}@example.com" for i in range(5)))
    ids = claim(engine)
    fake = FakeTime()
    limiter = LocalLimiter(daily=3, clock=fake.monotonic)
    report = limited(engine, settings, fake, limiter, MemoryTransport()).send_batch(ids)
    assert (report.sent, report.given_back, report.failed, report.retry) == (3, 2, 0, 0)
    left = [d for d in rows(engine).values() if d.id in ids and d.state != "sent"]
    assert [(d.state, d.attempts, d.last_error, d.first_tried_at) for d in left] == [
        ("scheduled", 0, None, None)
    ] * 2


def test_a_turn_after_the_soft_deadline_gives_the_rows_back_untried_and_the_lease_is_kept_meanwhile(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled("ana@example.com", "ben@example.com")
    ids = claim(engine)
    fake = FakeTime()
    leases: list[datetime] = []

    def look() -> None:
        with engine.connect() as c:
            leases.extend(
                c.scalars(select(Delivery.lease_until).where(Delivery.state == "claimed"))
            )

    fake.during = look
    limiter = LocalLimiter(rate=1 / 250, clock=fake.monotonic)  # one email every 250 s
    report = limited(engine, settings, fake, limiter, MemoryTransport()).send_batch(ids)
    assert (report.sent, report.given_back) == (1, 1)  # the second turn is past 299 s
    (left,) = [d for d in rows(engine).values() if d.id in ids and d.state != "sent"]
    assert (left.state, left.attempts, left.lease_until) == ("scheduled", 0, None)
    assert "DRIP_RATE_LIMIT" in (left.last_error or "")
    # while the first email waited 251 s for its turn, its lease was renewed (300 s from claim)
    assert max(leases) >= NOW + timedelta(seconds=200) + settings.lease


def test_a_turn_taken_for_a_row_that_is_no_longer_ours_goes_back_to_the_daily_quota(
    enrolled: Callable[..., None], engine: Engine, settings: Settings
) -> None:
    enrolled("ana@example.com", "ben@example.com", "cy@example.com")
    ids = claim(engine)
    fake = FakeTime()
    limiter = LocalLimiter(daily=3, clock=fake.monotonic)
    report = limited(engine, settings, fake, limiter, _TakenMeanwhile(engine)).send_batch(ids)
    assert (report.sent, report.not_ours) == (2, 1)
    assert limiter.daily_left().left == 1
