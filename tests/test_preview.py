"""`drip preview` and `drip send-test`: one email exactly as the worker builds it."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, select

from drip import db
from drip.claims import claim_due
from drip.cli import App, cli
from drip.clock import Clock
from drip.messages import SAMPLE_PATIENT
from drip.models import Delivery, Event, Patient
from drip.sending import Sender
from drip.settings import Settings
from drip.transports import MemoryTransport
from drip.unsubscribe import unsubscribe_url
from tests.conftest import TEST_SECRET
from tests.smtp_servers import CapturingServer, closed_port

Drip = Callable[..., Result]
CAMPAIGN = "ketamine-onboarding"
NOW = datetime(2026, 10, 30, 14, 0, tzinfo=UTC)  # the `env` fixture's DRIP_NOW: Fri 10:00 in NY
STRICT = policy.default.clone(raise_on_defect=True)


def parse(data: bytes) -> EmailMessage:
    return BytesParser(policy=STRICT).parsebytes(data)


def body(message: EmailMessage, subtype: str) -> str:
    part = message.get_body((subtype,))
    assert part is not None
    return str(part.get_content())


@pytest.fixture
def preview(tmp_path: Path) -> Drip:
    """`drip preview …` without a database (the sample patient needs none)."""

    def run(*args: str) -> Result:
        environ = {
            "DRIP_SECRET_KEY": TEST_SECRET,
            "DRIP_NOW": "2026-10-30T14:00:00Z",
            "DRIP_DATABASE_URL": f"sqlite:///{tmp_path / 'not-used.db'}",
        }
        return CliRunner().invoke(cli, ["preview", *args], obj=App(environ=environ))

    return run


@pytest.fixture
def enrol(drip: Drip) -> Callable[[str], None]:
    def run(email: str) -> None:
        result = drip(
            "enroll", email, "--campaign", CAMPAIGN, "--first-name", "Zoë",
            "--last-name", "O'Brien", "--first-session", "2026-11-09",
        )  # fmt: skip
        assert result.exit_code == 0, result.output

    return run


def patient_id(engine: Engine, email: str) -> int:
    with db.transaction(engine) as session:
        found = session.scalar(select(Patient.id).where(Patient.email == email))
    assert found is not None
    return found


def public_id(engine: Engine, email: str) -> str:
    with db.transaction(engine) as session:
        found = session.scalar(select(Patient.public_id).where(Patient.email == email))
    assert found is not None
    return found


# --- the sample patient -------------------------------------------------------------------------


def test_the_html_is_the_default_format_and_goes_to_stdout(preview: Drip) -> None:
    result = preview(CAMPAIGN, "welcome")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("<!DOCTYPE html>") and "Alex" in result.stdout
    assert "style=" in result.stdout  # inlined CSS, as sent


def test_the_text_part_is_for_the_sample_patient_with_a_working_unsubscribe_link(
    preview: Drip,
) -> None:
    result = preview(CAMPAIGN, "welcome", "--format", "text")
    assert result.exit_code == 0, result.output
    assert "Alex" in result.stdout
    link = unsubscribe_url(Settings.public_url, TEST_SECRET, SAMPLE_PATIENT.public_id)
    assert f"Unsubscribe: {link}" in result.stdout


def test_the_eml_parses_strictly_with_the_headers_every_email_has(preview: Drip) -> None:
    before = datetime.now(UTC)
    result = preview(CAMPAIGN, "welcome", "--format", "eml")
    ran = datetime.now(UTC) - before  # DRIP_NOW's clock can have run on this far, no more
    assert result.exit_code == 0, result.output
    message = parse(result.stdout_bytes)
    for name in ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version",
                 "List-Unsubscribe", "List-Unsubscribe-Post"):  # fmt: skip
        assert len(message.get_all(name, [])) == 1, name
    assert message["To"] == "alex.sample@example.com"
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    date = message["Date"].datetime
    assert date is not None and NOW <= date <= NOW + ran
    assert all(not defect for part in message.walk() for defect in part.defects)


def test_out_writes_the_file_and_says_where(preview: Drip, tmp_path: Path) -> None:
    out = tmp_path / "welcome.eml"
    result = preview(CAMPAIGN, "welcome", "--format", "eml", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    assert parse(out.read_bytes())["Subject"]


def test_open_writes_a_private_temporary_file_and_launches_it(
    preview: Drip, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: list[str] = []
    monkeypatch.setattr(click, "launch", lambda url, **_: launched.append(url) or 0)
    result = preview(CAMPAIGN, "welcome", "--format", "text", "--open")
    assert result.exit_code == 0, result.output
    (path,) = map(Path, launched)
    try:
        assert path.suffix == ".txt" and "Alex" in path.read_text(encoding="utf-8")
        assert path.stat().st_mode & 0o077 == 0
    finally:
        path.unlink()


def test_an_unknown_step_or_campaign_names_the_ones_that_exist(preview: Drip) -> None:
    result = preview(CAMPAIGN, "no-such-step")
    assert result.exit_code == 1
    assert "no step 'no-such-step'" in result.stderr and "welcome" in result.stderr
    result = preview("no-such-campaign", "welcome")
    assert result.exit_code == 1 and CAMPAIGN in result.stderr


# --- an enrolled patient ------------------------------------------------------------------------


def test_email_renders_for_that_patient_from_the_database(
    drip: Drip, engine: Engine, enrol: Callable[[str], None]
) -> None:
    enrol("ana@example.com")
    result = drip("preview", CAMPAIGN, "welcome", "--email", "ANA@example.com", "--format", "text")
    assert result.exit_code == 0, result.output
    assert "Zoë" in result.stdout and "Alex" not in result.stdout
    patient = public_id(engine, "ana@example.com")
    assert unsubscribe_url(Settings.public_url, TEST_SECRET, patient) in result.stdout


def test_an_unknown_patient_is_refused(drip: Drip) -> None:
    result = drip("preview", CAMPAIGN, "welcome", "--email", "nobody@example.com")
    assert result.exit_code == 1 and "no patient" in result.stderr


def test_the_preview_is_the_email_the_worker_sends(
    drip: Drip, engine: Engine, settings: Settings, enrol: Callable[[str], None]
) -> None:
    enrol("ana@example.com")
    later = NOW + timedelta(minutes=1)  # the welcome email is due at enrolment, just after NOW
    with db.transaction(engine) as session:
        ids = claim_due(session, now=later, limit=10, lease=timedelta(minutes=5))
    transport = MemoryTransport()
    report = Sender(engine, settings, transport, Clock(later), rng=random.Random(1)).send_batch(ids)
    assert report.sent == 1
    sent = parse(transport.messages[0][2])

    result = drip("preview", CAMPAIGN, "welcome", "--email", "ana@example.com", "--format", "eml")
    assert result.exit_code == 0, result.output
    shown = parse(result.stdout_bytes)
    # Only a real delivery carries its delivery id; Message-ID and Date are new for every email.
    assert [k for k in sent.keys() if k != "X-Drip-Delivery"] == list(shown.keys())
    for name in ("From", "To", "Subject", "MIME-Version", "List-Unsubscribe",
                 "List-Unsubscribe-Post"):  # fmt: skip
        assert shown[name] == sent[name], name
    assert body(shown, "plain") == body(sent, "plain")
    assert body(shown, "html") == body(sent, "html")


# --- test sends ---------------------------------------------------------------------------------


def events(engine: Engine) -> list[Event]:
    with db.transaction(engine) as session:
        return list(session.scalars(select(Event).where(Event.kind == "test.sent")))


def deliveries_by_state(engine: Engine) -> dict[str, int]:
    with db.transaction(engine) as session:
        query = select(Delivery.state, func.count()).group_by(Delivery.state)
        return {state: count for state, count in session.execute(query)}


def test_send_test_sends_one_marked_email_and_logs_it_without_the_address(
    drip: Drip, engine: Engine
) -> None:
    with CapturingServer() as server:
        mail_url = f"smtp://127.0.0.1:{server.port}"
        result = drip(
            "send-test", CAMPAIGN, "welcome", "--to", "Coordinator@Clinic.example",
            env={"DRIP_MAIL_URL": mail_url},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        (captured,) = server.wait_for(1)
    assert captured.rcpt_tos == ("Coordinator@clinic.example",)
    message = parse(captured.data)
    assert message["Subject"].startswith("[TEST] ") and message["To"] == captured.rcpt_tos[0]
    assert "Alex" in body(message, "plain")
    (event,) = events(engine)
    assert event.patient_id is None and event.detail is not None
    assert event.detail.startswith(f"{CAMPAIGN}/welcome")
    values = [str(v) for v in (event.actor, event.kind, event.detail)]
    assert not any("@" in value for value in values)
    assert deliveries_by_state(engine) == {}


def test_send_test_for_an_enrolled_patient_records_no_delivery(
    drip: Drip, engine: Engine, enrol: Callable[[str], None]
) -> None:
    enrol("ana@example.com")
    before = deliveries_by_state(engine)
    with CapturingServer() as server:
        result = drip(
            "send-test", CAMPAIGN, "medications", "--to", "me@clinic.example",
            "--email", "ana@example.com", env={"DRIP_MAIL_URL": f"smtp://127.0.0.1:{server.port}"},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        (captured,) = server.wait_for(1)
    assert captured.rcpt_tos == ("me@clinic.example",)
    assert "Zoë" in body(parse(captured.data), "plain")
    assert deliveries_by_state(engine) == before
    (event,) = events(engine)
    assert event.patient_id == patient_id(engine, "ana@example.com")
    assert event.detail is not None and "@" not in event.detail



def test_send_test_sends_nothing_to_an_address_that_is_suppressed(
    drip: Drip, engine: Engine, enrol: Callable[[str], None]
) -> None:
    """A patient who unsubscribed gets no email of any kind, a test one included."""
    enrol("ana@example.com")
    assert drip("suppress", "Ana@Example.com", "--reason", "asked by phone").exit_code == 0
    with CapturingServer() as server:
        result = drip(
            "send-test", CAMPAIGN, "welcome", "--to", "ANA@example.com",
            "--email", "ana@example.com", env={"DRIP_MAIL_URL": f"smtp://127.0.0.1:{server.port}"},
        )  # fmt: skip
        assert result.exit_code == 1, result.output
        assert server.connections == 0 and server.messages == []
    assert "--to" in result.stderr and "suppressed since" in result.stderr
    assert "ana@example.com" not in result.stderr.lower()
    assert "Traceback" not in result.output
    assert events(engine) == []

def test_send_test_refuses_a_bad_address(drip: Drip, engine: Engine) -> None:
    result = drip("send-test", CAMPAIGN, "welcome", "--to", "not an address")
    assert result.exit_code == 1 and "--to" in result.stderr
    assert events(engine) == []


def test_send_test_says_clearly_when_the_mail_server_fails(drip: Drip, engine: Engine) -> None:
    mail_url = f"smtp://127.0.0.1:{closed_port()}?timeout=5"
    result = drip(
        "send-test", CAMPAIGN, "welcome", "--to", "me@clinic.example",
        env={"DRIP_MAIL_URL": mail_url},
    )  # fmt: skip
    assert result.exit_code == 1
    assert "the test email was not sent" in result.stderr and "DRIP_MAIL_URL" in result.stderr
    assert "Traceback" not in result.output
    assert events(engine) == []


def test_send_test_refuses_an_unknown_step(drip: Drip) -> None:
    result = drip("send-test", CAMPAIGN, "nope", "--to", "me@clinic.example")
    assert result.exit_code == 1 and "its steps are" in result.stderr


def test_a_template_that_is_not_utf8_is_named_not_a_traceback(tmp_path: Path) -> None:
    templates = tmp_path / "emails"
    shutil.copytree(Settings().templates_dir, templates)
    (templates / CAMPAIGN / "welcome.txt.j2").write_bytes(b"\xff\xfe {{ first_name }}\n")
    environ = {
        "DRIP_SECRET_KEY": TEST_SECRET,
        "DRIP_TEMPLATES_DIR": str(templates),
        "DRIP_DATABASE_URL": f"sqlite:///{tmp_path / 'not-used.db'}",
    }
    result = CliRunner().invoke(
        cli, ["preview", CAMPAIGN, "welcome", "--format", "text"], obj=App(environ=environ)
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "welcome.txt.j2: is not UTF-8 text" in result.output


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process may not create files in: sysfs refuses even root."""
    if os.geteuid() == 0:
        return Path("/sys/kernel")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    return folder


@pytest.mark.parametrize(
    ("where", "says"),
    [
        (lambda tmp: tmp / "no" / "such" / "x.html", "does not exist"),
        (lambda tmp: tmp, "is a folder"),
        (lambda tmp: _unwritable_folder(tmp) / "x.html", "permission denied"),
    ],
    ids=["missing-folder", "a-folder", "no-permission"],
)
def test_out_where_it_cannot_be_written_names_the_path_and_the_fix(
    preview: Drip, tmp_path: Path, where: Callable[[Path], Path], says: str
) -> None:
    out = where(tmp_path)
    result = preview(CAMPAIGN, "welcome", "--out", str(out))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"--out: {out}" in result.output and says in result.output
    assert "Traceback" not in result.output
