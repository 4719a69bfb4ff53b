"""Building the bytes of one email (RFC 5322 + MIME) directly, in tens of microseconds.

Python's `email` package takes 2-3 ms to build a message, ten times an SMTP round trip on a pooled
connection. Every email drip sends has the same shape, so it is written out here by hand:

    headers                          From, To, Subject, Date, Message-ID, MIME-Version,
                                     List-Unsubscribe (+ -Post, RFC 8058), X-Drip-Delivery
    multipart/alternative
    ├── text/plain; charset="utf-8"  quoted-printable
    └── text/html;  charset="utf-8"  quoted-printable (last: clients show the last they can)

The costly header work, RFC 2047 encoding and folding of the From display name and the Subject,
is done by drip.headers once per distinct value and cached. Bodies go through
binascii.b2a_qp (C) line by line, each encoded line cached (a step's lines repeat in every email),
so lines are at most 76 characters and end in CRLF; a line that would start
with "." or "From " gets that character encoded, as some relays mangle such lines. Header lines
are ASCII, at most 78 characters where the value allows and never over 998; a value that would
start another header (a control character, an RFC 2047 encoded word: see drip.headers) or that
is not ASCII where it must be is refused with MessageError, which names the header and never
the value, rather than sent. Every way in refuses such values already; this is the last line.
The headers hold one To, the patient's address, and no Cc or Bcc: one message, one recipient.

`compose` is the one path from a campaign step and a patient to those bytes: the worker's Sender,
`drip preview`, `drip send-test` and the campaign linter all call it, so what they show is what is
sent.
"""

from __future__ import annotations

import binascii
import re
import secrets
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from email.utils import format_datetime
from functools import lru_cache

from drip import headers
from drip.addresses import split_from
from drip.campaigns import Campaign
from drip.errors import MessageError
from drip.rendering import Rendered, Renderer
from drip.settings import Settings
from drip.tokens import unsubscribe_url

CRLF = b"\r\n"
MAX_HEADER_LINE = 998
_PART_HEAD = (
    b'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
)
_HEADER_VALUE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces or line breaks
_QP_UNIT = re.compile(rb"=[0-9A-F]{2}|[^=]")
_LINE_START_ESCAPES = {b".": b"=2E", b"F": b"=46"}


@dataclass(frozen=True)
class Recipient:
    """Who one email is for: what its template and its unsubscribe link need to know."""

    email: str
    first_name: str
    last_name: str
    patient_id: int
    public_id: str  # what the unsubscribe link names (drip.unsubscribe)


SAMPLE_PATIENT = Recipient(
    email="alex.sample@example.com",
    first_name="Alex",
    last_name="Sample",
    patient_id=0,
    public_id="SamplePatientPublicId0",
)
"""Who previews and the linter write to when no patient is named. Clearly sample data:
example.com is reserved (RFC 2606); no patient has id 0, and none has that public id (theirs
are random), so the sample's unsubscribe link is well formed and names nobody."""


@dataclass(frozen=True)
class Composed:
    """One email ready to go: its Message-ID, its bytes, and the content they were built from."""

    message_id: str
    message: bytes
    rendered: Rendered


def compose(
    settings: Settings,
    renderer: Renderer,
    campaign: Campaign,
    step_key: str,
    recipient: Recipient,
    *,
    now: datetime,
    delivery_id: int | None = None,
    subject_prefix: str = "",
    message_id: str | None = None,
) -> Composed:
    """Render one step for one patient and build the message exactly as it is sent; a message
    sent again (a retry) passes the Message-ID it had, so a receiving client folds duplicates."""
    link = unsubscribe_url(settings.public_url, settings.secret_key, recipient.public_id)
    rendered = renderer.render(
        campaign,
        step_key,
        {
            "first_name": recipient.first_name,
            "last_name": recipient.last_name,
            "unsubscribe_url": link,
        },
    )
    if subject_prefix:
        rendered = replace(rendered, subject=subject_prefix + rendered.subject)
    message_id = message_id or make_message_id(settings.from_address)
    message = build_message(
        rendered,
        to=recipient.email,
        from_address=settings.from_address,
        message_id=message_id,
        date=now,
        unsubscribe_url=link,
        delivery_id=delivery_id,
    )
    return Composed(message_id, message, rendered)


def make_message_id(from_address: str) -> str:
    """A new globally unique Message-ID: <random.timestamp@the From address's domain>."""
    return f"<{secrets.token_hex(8)}.{time.time_ns()}@{_domain(from_address)}>"


@lru_cache(maxsize=64)
def envelope_from(from_address: str) -> str:
    """The envelope sender (SMTP MAIL FROM) for a From value like DRIP_FROM_ADDRESS: the bare
    addr-spec without its display name. One function, so every sender bounces to the same
    address."""
    return split_from(from_address)[1]


def build_message(
    rendered: Rendered,
    *,
    to: str,
    from_address: str,
    message_id: str,
    date: datetime,
    unsubscribe_url: str,
    delivery_id: int | None = None,
) -> bytes:
    """The whole message, CRLF line endings, ready for SMTP DATA or an .eml file."""
    boundary = b"=_drip_" + secrets.token_hex(12).encode()  # "=_" never occurs in QP output
    parts = [
        _headers(rendered, to, from_address, message_id, date, unsubscribe_url, delivery_id),
        b'Content-Type: multipart/alternative;\r\n boundary="%s"\r\n\r\n' % boundary,
        b"--%s\r\n" % boundary,
        _PART_HEAD % b"plain",
        _quoted_printable(rendered.text),
        b"\r\n--%s\r\n" % boundary,
        _PART_HEAD % b"html",
        _quoted_printable(rendered.html),
        b"\r\n--%s--\r\n" % boundary,
    ]
    return b"".join(parts)


def _headers(
    rendered: Rendered,
    to: str,
    from_address: str,
    message_id: str,
    date: datetime,
    unsubscribe_url: str,
    delivery_id: int | None,
) -> bytes:
    if date.tzinfo is None:
        raise ValueError("date must be timezone-aware: a Date header needs its offset")
    lines = [
        _from_header(from_address),
        b"To: %s\r\n" % _header_value("To", to, "the patient's address"),
        _subject_header(rendered.subject),
        _date_header(date, date.utcoffset()),
        b"Message-ID: %s\r\n" % _header_value("Message-ID", message_id, "the message's id"),
        b"MIME-Version: 1.0\r\n",
        _list_unsubscribe(
            _header_value("List-Unsubscribe", unsubscribe_url, "the unsubscribe link")
        ),
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
    ]
    if delivery_id is not None:
        lines.append(b"X-Drip-Delivery: %d\r\n" % delivery_id)
    return b"".join(lines)


def _list_unsubscribe(url: bytes) -> bytes:
    """The header on one line when it fits in 78 characters, else folded after the colon
    (RFC 5322 §2.2.3: a URL itself cannot be folded; RFC 2369 allows the break)."""
    line = b"List-Unsubscribe: <%s>\r\n" % url
    return line if len(line) <= 78 + 2 else b"List-Unsubscribe:\r\n <%s>\r\n" % url


def _header_value(name: str, value: str, what: str) -> bytes:
    """A value written as it is: printable ASCII without spaces or encoded words, so it cannot
    start another header. The error names the header and what is wrong, never the value (the
    To address is a patient's)."""
    found = headers.problem(value)
    if found is None and not _HEADER_VALUE.fullmatch(value):
        found = "is not printable ASCII without spaces"
    if found is None and len(value) > MAX_HEADER_LINE - 80:
        found = f"is longer than {MAX_HEADER_LINE - 80} characters"
    if found is not None:
        raise MessageError(f"the {name} header ({what}) {found}")
    return value.encode("ascii")


@lru_cache(maxsize=16)
def _date_header(date: datetime, offset: timedelta | None) -> bytes:
    """A batch composes every email with the same `now`, so each Date is formatted once. The
    offset is part of the key because equal instants in different zones compare (and hash)
    equal, yet their Date headers differ."""
    return b"Date: %s\r\n" % format_datetime(date).encode("ascii")


@lru_cache(maxsize=64)
def _from_header(from_address: str) -> bytes:
    """From with its display name, quoted or RFC 2047-encoded, folded (drip.headers)."""
    display_name, addr_spec = split_from(from_address)
    if "@" not in addr_spec:
        raise MessageError("the From address (DRIP_FROM) has no addr-spec like care@clinic.example")
    return headers.mailbox("From", display_name, addr_spec)


@lru_cache(maxsize=256)
def _subject_header(subject: str) -> bytes:
    """Subjects are per step, so each is encoded once."""
    return headers.unstructured("Subject", subject)


@lru_cache(maxsize=64)
def _domain(from_address: str) -> str:
    domain = envelope_from(from_address).rpartition("@")[2]
    if not domain:
        raise MessageError("the From address (DRIP_FROM) has no domain for a Message-ID")
    return domain.encode("idna").decode("ascii")


def _quoted_printable(text: str) -> bytes:
    """UTF-8 text as quoted-printable lines of at most 76 characters, CRLF, ending in CRLF.

    Quoted-printable works line by line (soft breaks and trailing-space escapes never cross a
    line end), so each line is encoded on its own and cached: the lines of a step's template are
    the same in every email, and only the few holding a patient's name or link are new."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if len(lines) > 1 and not lines[-1]:
        lines.pop()  # the text's final line end; one is added where it has none
    return b"".join(map(_quoted_printable_line, lines))


@lru_cache(maxsize=4096)
def _quoted_printable_line(line: str) -> bytes:
    """One line (without its end) encoded, with its CRLF.

    b2a_qp is fast but not quite right for mail: it lets a line start with "." or "From ", and it
    checks the length of a line ending in a space or tab before writing that whitespace as "=20",
    so `"x" * 74 + " "` comes out 77 characters long. Only such output is split and re-broken."""
    # b2a_qp writes CRLF soft breaks only when the data's first line end is a CRLF.
    encoded = binascii.b2a_qp(line.encode("utf-8") + CRLF, istext=True)
    if _unsafe(encoded) or b"\n." in encoded or b"\nFrom " in encoded or _last_too_long(encoded):
        encoded = CRLF.join(map(_mail_safe, encoded.split(CRLF)))
    return encoded


def _last_too_long(encoded: bytes) -> bool:
    """Whether the last line of b2a_qp's output (the only one it can make too long, by widening
    its final whitespace) is over 76 characters without its CRLF; searched from the end."""
    return len(encoded) - encoded.rfind(b"\n", 0, -2) - 3 > 76


def _mail_safe(line: bytes) -> bytes:
    """One encoded line as it may go out: re-broken if too long or if it starts badly."""
    return _rewrap(line) if len(line) > 76 or _unsafe(line) else line


def _unsafe(line: bytes) -> bool:
    return line.startswith((b".", b"From "))


def _rewrap(line: bytes) -> bytes:
    """Re-break one encoded line into lines of at most 76 characters, encoding a '.' or 'F'
    that would start any of them."""
    soft = line.endswith(b"=")
    lines, current = [], b""
    for unit in _QP_UNIT.findall(line[:-1] if soft else line):
        if len(current) + len(unit) > 75:
            lines.append(current + b"=")
            current = b""
        current += unit if current else _LINE_START_ESCAPES.get(unit, unit)
    lines.append(current + b"=" if soft else current)
    return CRLF.join(lines)
