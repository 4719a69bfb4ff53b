"""Unsubscribe links and what they do: a signed token naming a patient's public id, and
`unsubscribe`, which stops every email to that patient in one transaction.

A token is `<public id>.<signature>`: the patient's opaque random public id (22 characters of
base64url, drip.patients.new_public_id; never the row id, never the address) and an HMAC-SHA256
of it, cut to 128 bits, so a link cannot be forged for another patient. Tokens never expire (an
email from a year ago must still work). The first DRIP_SECRET_KEY signs; every one of them
verifies, so a key can be rotated without breaking the links in emails already sent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from drip import events, states, suppression
from drip.db import rowcount
from drip.models import ENDED, ENROLMENTS, PATIENTS

PURPOSE = b"drip-unsubscribe:"
# The unpadded urlsafe base64 of 16 random bytes, a dot, then that of a 16-byte signature
# (ASCII only: anything else is not a token drip made).
TOKEN = re.compile(r"([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{22})")
REASON = "unsubscribed"
P, E = PATIENTS.c, ENROLMENTS.c


def _signature(secret: str, public_id: str) -> str:
    digest = hmac.new(secret.encode(), PURPOSE + public_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def make_token(secret: str, public_id: str) -> str:
    return f"{public_id}.{_signature(secret, public_id)}"


def read_token(secrets: str | Sequence[str], token: str) -> str | None:
    """The public id a token was made for by any of `secrets`, or None if it is malformed
    (whatever the characters), truncated or forged."""
    match = TOKEN.fullmatch(token)
    if match is None:
        return None
    public_id = match[1]
    keys = (secrets,) if isinstance(secrets, str) else secrets
    for key in keys:
        if hmac.compare_digest(match[2], _signature(key, public_id)):
            return public_id
    return None


def unsubscribe_url(public_url: str, secret: str, public_id: str) -> str:
    return f"{public_url.rstrip('/')}/unsubscribe/{make_token(secret, public_id)}"


@dataclass(frozen=True)
class Unsubscribed:
    """What one unsubscribe did (ids and counts only: nothing personal). `already`: the patient
    had unsubscribed before, and nothing changed. `in_flight`: emails already `sending`, beyond
    recall."""

    patient_id: int
    already: bool
    ended_enrolments: int
    skipped: int
    in_flight: int
    campaigns: tuple[str, ...]


def unsubscribe(
    session: Session, *, token: str, keys: Sequence[str], now: datetime, source: str
) -> Unsubscribed | None:
    """Stop every email to the patient a token names (None, and nothing changed, when the token
    is invalid or names no patient): their unsubscribe time, every open enrolment ended, every
    unsent delivery skipped (claimed ones too: the batch holding them finds them gone), the
    address on the suppression list, an event. In the caller's transaction.

    Idempotent, and safe when two requests come at once: the conditional UPDATE on
    `unsubscribed_at IS NULL` lets one of them do the work (PostgreSQL makes the other wait
    for its row lock, then re-checks and finds it done); the other answers `already`."""
    public_id = read_token(keys, token)
    if public_id is None:
        return None
    patient = session.execute(select(P.id, P.email).where(P.public_id == public_id)).first()
    if patient is None:
        return None
    marked = session.execute(
        update(PATIENTS)
        .where(P.id == patient.id, P.unsubscribed_at.is_(None))
        .values(unsubscribed_at=now)
    )
    if rowcount(marked) == 0:
        return Unsubscribed(patient.id, True, 0, 0, 0, ())
    return _stop(session, patient.id, patient.email, keys, now=now, source=source)


def _stop(
    session: Session, patient_id: int, email: str, keys: Sequence[str], *, now: datetime,
    source: str,
) -> Unsubscribed:  # fmt: skip
    ended = session.execute(
        update(ENROLMENTS)
        .where(E.patient_id == patient_id, E.status != ENDED)
        .values(status=ENDED, ended_at=now, ended_reason=REASON)
        .returning(E.id, E.campaign)
    ).all()
    mine = states.of_patient(patient_id)
    skipped = states.skip(session, mine, REASON, now)
    suppression.add(
        session, keys, email, reason=REASON, source=source, now=now, actor=ACTOR,
        patient_id=patient_id,
    )  # fmt: skip
    in_flight = states.in_flight(session, mine)
    campaigns = tuple(sorted({campaign for _, campaign in ended}))
    for enrolment_id, _ in ended:
        events.record(session, at=now, actor=ACTOR, kind="ended", patient_id=patient_id,
                      enrolment_id=enrolment_id, detail=REASON)  # fmt: skip
    events.record(
        session, at=now, actor=ACTOR, kind="patient.unsubscribed", patient_id=patient_id,
        detail=f"source={source} ended={len(ended)} skipped={skipped} in_flight={in_flight}",
    )  # fmt: skip
    return Unsubscribed(patient_id, False, len(ended), skipped, in_flight, campaigns)


ACTOR = "patient"
