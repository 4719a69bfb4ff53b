"""Hand-built MIME: the strict parser finds no defect, and every part decodes to what went in."""

from __future__ import annotations

import email
import quopri
import random
import re
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from drip.addresses import split_from
from drip.campaigns import load_campaign
from drip.errors import MessageError
from drip.messages import (
    _quoted_printable,
    build_message,
    envelope_from,
    make_message_id,
)
from drip.rendering import Rendered, Renderer
from drip.settings import PROJECT_ROOT, Settings

FROM = '"Lakeside Clinic (demo)" <care@clinic.example>'
URL = "https://drip.clinic.example/u/3.AbC_-9xYz"
DATE = datetime(2026, 11, 2, 10, 0, tzinfo=timezone(timedelta(hours=-5)))
STRICT = policy.default.clone(raise_on_defect=True)
RENDERED = Rendered(
    subject="Welcome to your care team",
    preheader="What these emails will cover",
    text="Hi Zoë,\n\nWelcome.\n",
    html='<!DOCTYPE html>\n<html lang="en"><body><p>Hi Zoë,</p></body></html>\n',
)


def build(rendered: Rendered = RENDERED, **overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "to": "zoe@example.com",
        "from_address": FROM,
        "message_id": "<abc.123@clinic.example>",
        "date": DATE,
        "unsubscribe_url": URL,
        "delivery_id": 42,
    } | overrides
    return build_message(rendered, **arguments)


def parse(raw: bytes) -> EmailMessage:
    """Parse strictly, and fail on any defect the strict policy only records."""
    message = BytesParser(policy=STRICT).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    for part in message.walk():
        assert not part.defects, part.defects
        for name, value in part.items():
            assert not getattr(value, "defects", ()), (name, value.defects)
    return message


def parts(message: EmailMessage) -> tuple[str, str]:
    """The decoded text and html parts, line ends as Python strings have them."""
    text, html = (part.get_content().replace("\r\n", "\n") for part in message.iter_parts())
    return text, html


def test_a_long_list_unsubscribe_is_folded_after_its_colon_and_reads_back_whole() -> None:
    base = "https://unsubscribe.lakeside-wellness-clinic.example/unsubscribe/"
    long_url = base + "A" * 22 + "." + "B" * 22
    raw = build(unsubscribe_url=long_url)
    assert b"List-Unsubscribe:\r\n <https://" in raw
    assert str(parse(raw)["List-Unsubscribe"]).strip() == f"<{long_url}>"  # the fold is blank
    assert b"List-Unsubscribe: <%s>" % URL.encode() in build()  # a short one stays on one line


def test_a_message_parses_strictly_with_every_header_drip_promises() -> None:
    message = parse(build())
    assert str(message["From"]) == FROM
    assert message["From"].addresses[0].display_name == "Lakeside Clinic (demo)"
    assert str(message["To"]) == "zoe@example.com"
    assert str(message["Subject"]) == RENDERED.subject
    assert parsedate_to_datetime(str(message["Date"])) == DATE
    assert str(message["Message-ID"]) == "<abc.123@clinic.example>"
    assert str(message["MIME-Version"]) == "1.0"
    assert str(message["List-Unsubscribe"]) == f"<{URL}>"
    assert str(message["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    assert str(message["X-Drip-Delivery"]) == "42"
    assert "X-Drip-Delivery" not in parse(build(delivery_id=None))


def test_the_body_is_text_then_html_quoted_printable_utf8_and_decodes_to_the_rendered_parts() -> (
    None
):
    message = parse(build())
    assert message.get_content_type() == "multipart/alternative"
    kinds = [part.get_content_type() for part in message.iter_parts()]
    assert kinds == ["text/plain", "text/html"]
    for part in message.iter_parts():
        assert part.get_content_charset() == "utf-8"
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts(message) == (RENDERED.text, RENDERED.html)


def test_a_rendered_campaign_email_round_trips() -> None:
    settings = Settings()
    campaign = load_campaign(PROJECT_ROOT / "templates" / "emails", "ketamine-onboarding")
    patient = {"first_name": "José-María", "last_name": "O'Brien", "unsubscribe_url": URL}
    renderer = Renderer(settings)
    for step in campaign.step_keys:
        rendered = renderer.render(campaign, step, patient)
        assert parts(parse(build(rendered))) == (rendered.text, rendered.html)


def test_a_non_ascii_subject_and_display_name_are_encoded_and_round_trip() -> None:
    subject = (
        "Bienvenue à votre équipe de soins, Zoë — voici ce qu’il faut savoir avant la visite 李"
    )
    sender = "Clínica Lago Azul «demo» <cuidado@clinica.example>"
    raw = build(
        Rendered(subject=subject, preheader="", text="x\n", html="<p>x</p>\n"),
        from_address=sender,
    )
    head = raw.split(b"\r\n\r\n", 1)[0]
    head.decode("ascii")  # RFC 2047 encoded words, not raw UTF-8
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    message = parse(raw)
    assert str(message["Subject"]) == subject
    assert message["From"].addresses[0].display_name == "Clínica Lago Azul «demo»"
    assert message["From"].addresses[0].addr_spec == "cuidado@clinica.example"


def test_lines_are_crlf_at_most_76_characters_in_bodies_and_78_in_headers() -> None:
    long_line = "word " * 60 + "Ünïcödé " * 30
    raw = build(Rendered("Hi", "", long_line + "\n" + "é" * 200, f"<p>{long_line}</p>\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    assert parts(parse(raw)) == (long_line + "\n" + "é" * 200 + "\n", f"<p>{long_line}</p>\n")


def test_lines_starting_with_a_dot_or_from_are_encoded_and_everything_round_trips() -> None:
    """Random texts full of the awkward cases: dots and "From " at line starts, after soft breaks
    too, long lines, trailing spaces, non-ASCII, = signs."""
    pieces = [".", "..", "From ", "From", "=", " ", "\t", "a", "word ", "ü", "李", "\n", "\n.", "-"]
    chooser = random.Random(20261102)
    for _ in range(300):
        text = "".join(chooser.choice(pieces) for _ in range(chooser.randint(1, 400))) + "\n"
        raw = build(Rendered("Hi", "", text, "<p>x</p>\n"))
        body = raw.split(b"\r\n\r\n", 1)[1]
        for line in body.split(b"\r\n"):
            assert len(line) <= 76, line
            assert not line.startswith((b".", b"From ")), line
        assert parts(parse(raw))[0] == text


def test_message_ids_are_unique_and_use_the_from_domain() -> None:
    ids = {make_message_id(FROM) for _ in range(1000)}
    assert len(ids) == 1000
    for message_id in ids:
        assert re.fullmatch(r"<[0-9a-f]+\.[0-9]+@clinic\.example>", message_id)
    assert make_message_id("Clinic <care@bücher.example>").endswith("@xn--bcher-kva.example>")


def test_the_date_of_the_same_instant_in_another_zone_keeps_its_own_offset() -> None:
    """Dates are cached, and equal instants in different zones are equal keys but not equal
    headers."""
    in_utc = DATE.astimezone(UTC)
    assert in_utc == DATE
    for date, zone in [(DATE, "-0500"), (in_utc, "+0000"), (DATE, "-0500")]:
        header = str(parse(build(date=date))["Date"])
        assert header.endswith(zone) and parsedate_to_datetime(header) == DATE


def test_the_envelope_sender_is_the_from_address_without_its_display_name() -> None:
    assert envelope_from(FROM) == "care@clinic.example"
    assert envelope_from("care@clinic.example") == "care@clinic.example"
    assert envelope_from("Lakeside Wellness, LLC <care@lakeside.example>") == (
        "care@lakeside.example"
    )


@pytest.mark.parametrize(
    "sender",
    [
        "Lakeside Wellness, LLC <care@lakeside.example>",
        '"Lakeside Wellness, LLC" <care@lakeside.example>',
        "Lakeside Wellness, LLC (demo) <care@lakeside.example>",
    ],
)
def test_a_display_name_with_a_comma_is_quoted_and_reads_back(sender: str) -> None:
    raw = build(from_address=sender)
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    assert '"Lakeside Wellness, LLC' in head
    (address,) = parse(raw)["From"].addresses
    assert address.display_name == sender.rpartition(" <")[0].strip('"')
    assert address.addr_spec == "care@lakeside.example"


@pytest.mark.parametrize(
    "bad",
    [
        {"to": "zoe@example.com\r\nBcc: all@example.com"},
        {"to": "zoe@example.com\n"},
        {"to": "Zoë <zoe@example.com>"},
        {"to": "=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?=@example.com"},
        {"message_id": "<a@b>\r\nX: y"},
        {"unsubscribe_url": "https://x.example/u/é"},
        {"from_address": "no address"},
        {"from_address": "=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?= <care@clinic.example>"},
        {"from_address": "Clinic\u2028Bcc: a@evil.example <care@clinic.example>"},
    ],
)
def test_values_that_would_break_the_headers_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(MessageError):
        build(**bad)


def test_a_date_without_its_offset_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        build(date=datetime(2026, 11, 2, 10, 0))


@pytest.mark.parametrize(
    "subject",
    [
        "Hi\r\nBcc: x@example.com",
        "Hi\n",
        "Hi\x00",
        "Hi\x85Bcc: x@example.com",  # NEL
        "Hi\u2028Bcc: x@example.com",
        "=?utf-8?q?x=0D=0ABcc:_a@evil.example?=",
        "=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?=",
        "",
    ],
)
def test_a_subject_that_would_start_another_header_is_refused_not_decoded(subject: str) -> None:
    """The email package decodes an encoded word given as a header's text and wrote its CR LF
    out as a `Bcc:` line of its own; now no such subject is written at all."""
    with pytest.raises(MessageError, match="Subject") as refused:
        build(Rendered(subject, "", "x", "x"))
    assert "evil" not in str(refused.value) and "Bcc" not in str(refused.value)


def test_an_address_that_cannot_go_in_a_header_is_refused_without_naming_it() -> None:
    with pytest.raises(MessageError) as refused:
        build(to="zoe.secret@example.com\r\nBcc: a@evil.example")
    message = str(refused.value)
    assert "To header" in message and "U+000D (CARRIAGE RETURN)" in message
    assert "zoe.secret" not in message and "evil" not in message


DISPLAY_NAMES = [
    "Lakeside Wellness, LLC",
    'The "Lakeside" Clinic',
    "O'Brien & Sons \\ Partners (demo)",
    "Lakeside Wellness Clinic of Greater Springfield, Partners in Care and Behavioral Health, LLC",
    "Clínica de Bienestar Lakeside, S.L.",
    "Zoë O'Brien-Łukasiewicz, Ψυχική Υγεία",
    "Клиника «Озёрная», отделение психического здоровья и благополучия",
    "李小龍 醫療中心",
    "Nguyễn Thị Minh Khai Wellness Center 😀",
    "x" * 90,
    "é" * 90,
]
SUBJECTS = [
    "Welcome to your care team",
    "Questions about cost and coverage: what to ask, who to call, and when, before your visit",
    "Bienvenue à votre équipe de soins, Zoë — voici ce qu’il faut savoir avant la visite 李",
    'A "quoted" subject, with commas; and (parentheses) <angles> @ signs \\ backslashes',
    "Sehr geehrte Patientin, herzlich willkommen in der Lakeside-Klinik für Ihre erste Sitzung",
    "x" * 120,
    "long_" * 30,
]


def test_nasty_but_legal_names_and_subjects_make_one_recipient_and_decode_back() -> None:
    """Long non-ASCII names, quotes, commas, backslashes: every message re-parsed strictly has
    exactly one From, one To with one address, no Cc or Bcc, lines of at most 78 characters,
    and headers that decode (email.header.decode_header, as mail clients do) to what went in."""
    for display_name in DISPLAY_NAMES:
        for subject in SUBJECTS:
            raw = build(
                Rendered(subject, "", "x\n", "<p>x</p>\n"),
                from_address=f"{display_name} <care@clinic.example>",
            )
            head = raw.split(b"\r\n\r\n", 1)[0]
            assert max(len(line) for line in head.split(b"\r\n")) <= 78, head
            message = parse(raw)
            assert message.get_all("To") is not None and len(message.get_all("To")) == 1
            assert [a.addr_spec for a in message["To"].addresses] == ["zoe@example.com"]
            assert all(message.get(name) is None for name in ("Cc", "Bcc", "Resent-To"))
            (sender,) = message["From"].addresses
            assert sender.addr_spec == "care@clinic.example"
            assert str(message["Subject"]) == subject
            assert _decoded_display_name(raw) == display_name


def test_a_display_name_without_a_split_word_reads_back_exactly_with_the_email_package() -> None:
    for display_name in [*DISPLAY_NAMES[:5], "李小龍 醫療中心"]:
        message = parse(build(from_address=f"{display_name} <care@clinic.example>"))
        assert message["From"].addresses[0].display_name == display_name


def test_random_display_names_and_subjects_fold_under_78_and_decode_back() -> None:
    rng = random.Random(5322)
    pieces = ["Zoë", "O'Brien", '"q"', ",", " ", "  ", "李小龍", "Ελληνικά", "x" * 30, "😀",
              "(", ")", "\\", ";", ":", "@", ".", "Lakeside", "é" * 40, "a" * 80, "-", "=",
              "?", "_", "e\u0301", "!", "*", "/"]  # fmt: skip
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 20))).strip(" ")
        if not text or "=?" in text:
            continue
        raw = build(Rendered(text, "", "x\n", "x\n"), from_address=f"{text} <c@clinic.example>")
        head = raw.split(b"\r\n\r\n", 1)[0]
        assert max(len(line) for line in head.split(b"\r\n")) <= 78, head
        message = parse(raw)
        assert str(message["Subject"]) == text
        assert [a.addr_spec for a in message["From"].addresses] == ["c@clinic.example"]
        assert _decoded_display_name(raw) == split_from(f"{text} <c@clinic.example>")[0]


def _decoded_display_name(raw: bytes) -> str:
    """The From display name as RFC 2047 §6.2 decodes it (whitespace between two encoded words
    ignored), read from the raw header: the email package's own reading puts a space there."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    (field,) = re.findall(r"(?m)^From:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head)
    phrase = field.replace("\r\n", "").rsplit("<", 1)[0].strip()
    if phrase.startswith('"'):
        return re.sub(r"\\(.)", r"\1", phrase[1:-1])
    return str(make_header(decode_header(phrase)))


def _awkward_text(rng: random.Random) -> str:
    """A text made of the cases quoted-printable gets wrong: lines of exactly 73-78 characters,
    whitespace where a line or a soft break ends, '=', non-ASCII straddling the 76th column, dots
    and "From " at line starts, every kind of line end."""
    pieces = ["a", "x" * 10, " ", "\t", "  ", "=", "é", "😀", "李", ".", "From ", "\x0c", "\x7f"]
    ends = ["\n", "\r\n", "\r"]
    lines = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.5:
            line = "x" * rng.randint(60, 160)
        else:
            line = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.5:  # pad to exactly 73-78 characters, often ending in whitespace
            width = rng.randint(73, 78)
            tail = rng.choice(["", " ", "\t", "=", "é", "  "])
            line = (line + "y" * width)[: max(width - len(tail), 0)] + tail
        lines.append(line + rng.choice(ends))
    text = "".join(lines)
    return text if rng.random() < 0.7 else text.rstrip("\r\n") + rng.choice(["", " ", "\t"])


def _as_sent(text: str) -> bytes:
    """What a reader must get back: the text in UTF-8, CRLF line ends, ending in one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return (text if text.endswith("\n") else text + "\n").replace("\n", "\r\n").encode("utf-8")


def _check_quoted_printable(text: str) -> None:
    """RFC 2045 6.7 checked line by line, and decoded by the standard library, not by drip."""
    encoded = _quoted_printable(text)
    assert encoded.isascii() and encoded.endswith(b"\r\n"), encoded
    lines = encoded[:-2].split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines), encoded
    for line in lines:
        assert len(line) <= 76, (text, line)
        assert not line.endswith((b" ", b"\t")), (text, line)
        assert not line.startswith((b".", b"From ")), (text, line)
    assert quopri.decodestring(encoded) == _as_sent(text), text
    head = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
    parsed = email.message_from_bytes(head + b"\r\n\r\n" + encoded)
    assert parsed.get_payload(decode=True) == _as_sent(text), text


@pytest.mark.parametrize("width", range(70, 80))
@pytest.mark.parametrize("tail", ["", " ", "\t", "=", "é", ".", "  ", " x"])
def test_a_line_of_any_length_near_76_is_encoded_in_76_characters(width: int, tail: str) -> None:
    _check_quoted_printable("x" * (width - len(tail)) + tail + "\n")
    _check_quoted_printable("x" * (width - len(tail)) + tail)


def test_quoted_printable_agrees_with_the_standard_library_on_awkward_texts() -> None:
    rng = random.Random(2045)
    for _ in range(5000):
        _check_quoted_printable(_awkward_text(rng))


def test_a_from_with_an_international_domain_is_sent_in_its_xn_form() -> None:
    settings = Settings.from_env({"DRIP_FROM": "Clínica Lago <care@clínica.example>"})
    message = parse(build(from_address=settings.from_address))
    address = message["From"].addresses[0]
    assert (address.display_name, address.addr_spec) == (
        "Clínica Lago",
        "care@xn--clnica-4va.example",
    )
    assert envelope_from(settings.from_address) == "care@xn--clnica-4va.example"
    assert make_message_id(settings.from_address).endswith("@xn--clnica-4va.example>")
