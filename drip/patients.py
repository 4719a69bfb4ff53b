"""Checking what a coordinator types or uploads about a patient, before anything is written.

Each check returns the clean value or raises InputError(field, reason) whose reason says how to fix
it. `check_patient` runs them all on one record and reports every bad field, not just the first.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import EmailNotValidError, validate_email

from drip.errors import InputError
from drip.planning import FirstSession, local_to_utc

T = TypeVar("T")
NAME_MAX = 100
FIRST_SESSION_PAST = timedelta(days=30)
FIRST_SESSION_FUTURE = timedelta(days=366)
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_REFUSED_CATEGORIES = {"Cc", "Cs", "Co", "Cn", "Zl", "Zp"}  # controls, surrogates, unassigned…
_MARKUP = set("<>")


@dataclass(frozen=True)
class PatientInput:
    """One patient as a coordinator gave them, checked and normalised."""

    email: str
    first_name: str
    last_name: str | None
    timezone: str
    first_session: FirstSession | None

    @property
    def email_key(self) -> str:
        return email_key(self.email)


def email_key(email: str) -> str:
    """The lookup key of an address: the same mailbox typed in another case is the same patient."""
    return email.strip().lower()


def check_email(raw: str) -> str:
    """Syntax only (no DNS); the domain is normalised (lower case, IDNA)."""
    raw = raw.strip()
    if not raw:
        raise InputError("email", "is empty; give the patient's address, like ana@example.com")
    try:
        result = validate_email(raw, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as e:
        raise InputError("email", f"{raw!r} is not a valid address: {e}") from None
    return str(result.ascii_email or result.normalized)


def check_name(raw: str, field: str, *, required: bool) -> str | None:
    """1-100 printable characters; no control characters, line breaks, tabs or markup."""
    value = unicodedata.normalize("NFC", raw.strip())
    if not value:
        if required:
            raise InputError(field, "is empty; give the name the patient goes by")
        return None
    if len(value) > NAME_MAX:
        raise InputError(field, f"is {len(value)} characters long; shorten it to {NAME_MAX}")
    for char in value:
        if char == "\t" or unicodedata.category(char) in _REFUSED_CATEGORIES:
            name = unicodedata.name(char, f"U+{ord(char):04X}")
            raise InputError(field, f"contains a control character ({name}); remove it")
        if char in _MARKUP:
            raise InputError(field, f"contains {char!r}; names cannot contain < or >")
    return value


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def check_timezone(raw: str, default: str) -> str:
    """An IANA zone name such as Europe/London; blank means the clinic's zone."""
    value = raw.strip() or default
    try:
        zone(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(
            "timezone", f"{value!r} is not an IANA time zone; use a name like America/Chicago"
        ) from None
    return value


def check_first_session(raw: str, tz: str, now: datetime) -> FirstSession | None:
    """ISO date or date-time, in the patient's zone; at most 30 days ago and a year ahead."""
    value = raw.strip()
    if not value:
        return None
    local_zone = zone(tz)
    try:
        if _DATE_ONLY.match(value):
            session = FirstSession(date.fromisoformat(value))
        else:
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                parsed = parsed.astimezone(local_zone).replace(tzinfo=None)
            session = FirstSession(parsed.date(), time(parsed.hour, parsed.minute))
    except ValueError:
        raise InputError(
            "first_session",
            f"{value!r} is not a date or date-time; write it like 2026-12-03 or 2026-12-03T14:30",
        ) from None
    starts = local_to_utc(session.on, session.at or time(0), local_zone)
    if starts < now - FIRST_SESSION_PAST:
        raise InputError("first_session", f"{value} is more than 30 days ago; check the year")
    if starts > now + FIRST_SESSION_FUTURE:
        raise InputError("first_session", f"{value} is more than a year ahead; check the year")
    return session


def check_patient(
    fields: dict[str, str], *, default_timezone: str, now: datetime
) -> PatientInput | list[InputError]:
    """Every check on one record; the clean patient, or every problem found."""
    problems: list[InputError] = []

    def run(check: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        try:
            return check(*args, **kwargs)
        except InputError as e:
            problems.append(e)
            return None

    email = run(check_email, fields.get("email", ""))
    first = run(check_name, fields.get("first_name", ""), "first_name", required=True)
    last = run(check_name, fields.get("last_name", ""), "last_name", required=False)
    tz = run(check_timezone, fields.get("timezone", ""), default_timezone)
    session = run(check_first_session, fields.get("first_session", ""), tz, now) if tz else None
    if problems or email is None or first is None or tz is None:
        return problems
    return PatientInput(email, first, last, tz, session)
