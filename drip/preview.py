"""Looking at one email before any patient gets it: `drip preview` and `drip send-test`.

Both build the message with drip.messages.compose, the worker's own path (same renderer, same
headers, a fresh Message-ID, the Date from the clock, a signed unsubscribe link), for an enrolled
patient or for SAMPLE_PATIENT. A test send goes through the configured transport with "[TEST] "
before the subject; it is no delivery (nothing in `deliveries`), only an event of kind `test.sent`
that, like every event, holds ids and never an address.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from sqlalchemy.orm import Session

from drip import events, suppression
from drip.campaigns import Campaign
from drip.enrolment import find_patient
from drip.errors import DeliveryError, InputError
from drip.messages import SAMPLE_PATIENT, Composed, Recipient, compose, envelope_from
from drip.patients import check_email
from drip.rendering import Renderer
from drip.settings import Settings
from drip.transports import Transport

FORMATS = ("html", "text", "eml")
SUFFIXES = {"html": ".html", "text": ".txt", "eml": ".eml"}
TEST_SUBJECT_PREFIX = "[TEST] "
TEST_SENT = "test.sent"


def recipient(session: Session, email: str | None) -> Recipient:
    """The enrolled patient with this address (NotFound if none), or the sample patient."""
    if email is None:
        return SAMPLE_PATIENT
    patient = find_patient(session, email)
    return Recipient(
        patient.email, patient.first_name, patient.last_name or "", patient.id, patient.public_id
    )


def preview(
    settings: Settings, campaign: Campaign, step_key: str, who: Recipient, *, now: datetime
) -> Composed:
    """One email exactly as the worker would build it now (no delivery id: it is not one)."""
    return compose(settings, Renderer(settings), campaign, step_key, who, now=now)


def as_format(composed: Composed, fmt: str) -> bytes:
    """The HTML part, the text part, or the whole message (CRLF line endings), as bytes."""
    if fmt == "html":
        return composed.rendered.html.encode("utf-8")
    if fmt == "text":
        return composed.rendered.text.encode("utf-8")
    if fmt == "eml":
        return composed.message
    raise InputError("--format", f"{fmt!r} is not one of {', '.join(FORMATS)}")


def send_test(
    settings: Settings,
    transport: Transport,
    campaign: Campaign,
    step_key: str,
    who: Recipient,
    *,
    to: str,
    now: datetime,
) -> Composed:
    """Render for `who`, send to `to` with "[TEST] " before the subject; record nothing."""
    address = test_address(to)
    composed = compose(
        settings,
        Renderer(settings),
        campaign,
        step_key,
        replace(who, email=address),
        now=now,
        subject_prefix=TEST_SUBJECT_PREFIX,
    )
    try:
        transport.send(envelope_from(settings.from_address), address, composed.message)
    except DeliveryError as e:
        raise DeliveryError(f"the test email was not sent: {e}; check DRIP_MAIL_URL") from e
    return composed


def test_address(to: str) -> str:
    """--to, checked as a patient's address is."""
    try:
        return check_email(to)
    except InputError as e:
        raise InputError("--to", e.reason) from None


def refuse_suppressed(session: Session, keys: suppression.Keys, to: str) -> None:
    """A suppressed address (a patient who unsubscribed, a bounce, `drip suppress`) gets no
    email from drip, a test one included: InputError naming --to, never the address."""
    entry = suppression.find(session, keys, test_address(to))
    if entry is not None:
        raise InputError(
            "--to",
            f"the address is {entry.describe()}: drip sends it nothing, not even a test; send "
            "the test to another address",
        )


def record_test_sent(
    session: Session,
    campaign: Campaign,
    step_key: str,
    who: Recipient,
    *,
    now: datetime,
    actor: str,
) -> None:
    """The event of a test send: campaign, step and patient id (none for the sample patient)."""
    sample = who == SAMPLE_PATIENT
    events.record(
        session,
        at=now,
        actor=actor,
        kind=TEST_SENT,
        patient_id=None if sample else who.patient_id,
        detail=f"{campaign.slug}/{step_key}" + (" (sample patient)" if sample else ""),
    )
