"""Checking what a coordinator types or uploads about a patient, before anything is written.

Each check returns the clean value or raises InputError(field, reason) whose reason says how to fix
it. `check_patient` runs them all on one record and reports every bad field, not just the first.
"""

from __future__ import annotations

import base64
import re
import secrets
import unicodedata
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from email_validator import EmailNotValidError, validate_email

from drip.errors import InputError
from drip.planning import FirstSession, local_to_utc

T = TypeVar("T")
NAME_MAX = 100
FIRST_SESSION_PAST = timedelta(days=30)
FIRST_SESSION_FUTURE = timedelta(days=366)
_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")
# The documented forms: a date, or a date and a local time (seconds allowed, as spreadsheets
# write them), optionally with an explicit offset. Not ISO's other forms (20261203, 2026-W49-4).
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?(Z|[+-]\d{2}:\d{2})?")
FIRST_SESSION_FORMS = "2026-12-03, 2026-12-03T14:30 or 2026-12-03 14:30"
_REFUSED_CATEGORIES = {
    "Cc": "a control character",
    "Cf": "an invisible formatting character",
    "Cs": "a surrogate",
    "Co": "a private-use character",
    "Cn": "an unassigned character",
    "Zl": "a line break",
    "Zp": "a paragraph break",
}
# Persian, Kurdish and the Indic scripts spell some names with these; between two letters (or
# a letter and its mark) they only choose a letter's joined form, which cannot hide, reorder or
# spoof anything. Anywhere else (at an end, beside a space) they are refused like any Cf.
_JOINERS = {"\u200c", "\u200d"}  # ZERO WIDTH NON-JOINER, ZERO WIDTH JOINER
_MARKUP = set("<>")
_NOT_ZONES = {"localtime", "posixrules", "Factory"}  # this host's files, not places


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


def new_public_id() -> str:
    """A patient's public id: 128 random bits, unpadded base64url (22 characters). It names the
    patient in unsubscribe links and says nothing about them (not their row id, not their
    address); guessing one is hopeless, and a link needs a valid signature besides."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()


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
    for i, char in enumerate(value):
        if 0xDC80 <= ord(char) <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
            raise InputError(
                field,
                f"is not UTF-8 text (byte 0x{ord(char) - 0xDC00:02X}); type it again in a "
                "terminal set to UTF-8, or save the file as CSV UTF-8",
            )
        kind = "a control character" if char == "\t" else _refused_kind(value, i)
        if kind:
            raise InputError(field, f"contains {kind}, {_code_point(char)}; remove it")
        if char in _MARKUP:
            raise InputError(field, f"contains {char!r}; names cannot contain < or >")
    return value


REASON_MAX = 200


def check_reason(raw: str, field: str) -> str:
    """An operator's reason (for a suppression, a resubscribe): 1-200 printable characters on
    one line. It goes into the event log, which holds no personal data: say why, not who."""
    value = unicodedata.normalize("NFC", raw.strip())
    if not value:
        raise InputError(field, 'is empty; say why, like --reason "asked by phone 2026-12-01"')
    if len(value) > REASON_MAX:
        raise InputError(field, f"is {len(value)} characters long; shorten it to {REASON_MAX}")
    for i, char in enumerate(value):
        kind = "a control character" if char == "\t" else _refused_kind(value, i)
        if kind:
            raise InputError(field, f"contains {kind}, {_code_point(char)}; remove it")
    return value


def _refused_kind(value: str, i: int) -> str | None:
    """What makes value[i] unfit for a name (see _REFUSED_CATEGORIES), or None."""
    char = value[i]
    if char in _JOINERS and 0 < i < len(value) - 1:
        if all(unicodedata.category(c)[0] in "LM" for c in (value[i - 1], value[i + 1])):
            return None
    return _REFUSED_CATEGORIES.get(unicodedata.category(char))


def _code_point(char: str) -> str:
    """U+202E (RIGHT-TO-LEFT OVERRIDE): ASCII, so the character itself is never echoed."""
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" ({name})" if name else "")


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=1)
def iana_zones() -> frozenset[str]:
    """The zone names one may give: the IANA database's, including its links for old names
    (US/Eastern, UTC, Etc/GMT+5), but not the posix/ and right/ copies (right/ counts leap
    seconds: its clocks run 27 s apart from everyone's) nor a host's own files (localtime)."""
    return frozenset(
        name
        for name in zoneinfo.available_timezones()
        if not name.startswith(("posix/", "right/")) and name not in _NOT_ZONES
    )


def iana_zone_problem(name: str) -> str | None:
    """Why `name` is not an IANA time zone, with the fix; None when it is one. The one test
    for a patient's zone (command line and CSV) and DRIP_CLINIC_TIMEZONE."""
    if name in iana_zones():
        return None
    spelled = next((z for z in sorted(iana_zones()) if z.lower() == name.lower()), None)
    if spelled:
        return f"{name!r} is not an IANA time zone; write it {spelled!r}"
    return f"{name!r} is not an IANA time zone; give its Area/City name, like America/Chicago"


def check_timezone(raw: str, default: str) -> str:
    """An IANA zone name such as Europe/London; blank means the clinic's zone."""
    value = raw.strip() or default
    if problem := iana_zone_problem(value):
        raise InputError("timezone", problem)
    return value


def check_first_session(raw: str, tz: str, now: datetime) -> FirstSession | None:
    """ISO date or date-time, in the patient's zone; at most 30 days ago and a year ahead."""
    value = raw.strip()
    if not value:
        return None
    local_zone = zone(tz)
    try:
        if _DATE_ONLY.fullmatch(value):
            session = FirstSession(date.fromisoformat(value))
        else:
            if not _DATE_TIME.fullmatch(value):
                raise ValueError(value)
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                parsed = parsed.astimezone(local_zone).replace(tzinfo=None)
            session = FirstSession(parsed.date(), time(parsed.hour, parsed.minute))
    except ValueError:
        raise InputError(
            "first_session",
            f"{value!r} is not a date or date-time; write it like {FIRST_SESSION_FORMS}",
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
