"""What may go into a header, and how drip folds and encodes the ones holding free text."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser

import pytest

from drip.errors import MessageError
from drip.headers import mailbox, problem, unstructured


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a\r\nBcc: x", "U+000D (CARRIAGE RETURN)"),
        ("a\n", "U+000A (LINE FEED)"),
        ("a\x00", "U+0000 (NUL)"),
        ("a\tb", "U+0009 (TAB)"),
        ("a\x7f", "U+007F (DELETE)"),
        ("a\x85b", "U+0085 (NEXT LINE)"),
        ("a\x9bb", "U+009B"),  # a C1 control
        ("a\u2028b", "U+2028 (LINE SEPARATOR)"),
        ("a\u2029b", "U+2029 (PARAGRAPH SEPARATOR)"),
        ("a\ud800", "U+D800"),
        ("=?utf-8?q?x=0D=0ABcc:_a@evil?=", "encoded word"),
        ("=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?=", "encoded word"),
        ("Hi =?", "encoded word"),
    ],
)
def test_what_could_start_another_header_is_named_by_code_point(text: str, says: str) -> None:
    found = problem(text)
    assert found is not None and says in found and found.isascii()
    assert "evil" not in found


@pytest.mark.parametrize("text", ["Welcome", "Zoë O'Brien, «demo» 李", "a = b? c", "x" * 500])
def test_ordinary_text_has_no_problem(text: str) -> None:
    assert problem(text) is None


def test_a_plain_subject_is_written_as_it_is_and_folded_at_a_space() -> None:
    assert unstructured("Subject", "Welcome to your care team") == (
        b"Subject: Welcome to your care team\r\n"
    )
    words = " ".join(["coverage"] * 20)
    folded = unstructured("Subject", words)
    lines = folded.split(b"\r\n")[:-1]
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    assert folded.replace(b"\r\n ", b" ") == b"Subject: " + words.encode() + b"\r\n"


def test_a_first_word_too_long_for_the_first_line_is_encoded_not_folded_after_the_colon() -> (
    None
):
    """The email package reads a fold right after `Subject:` as a space of the subject."""
    word = "x" * 75
    folded = unstructured("Subject", word)
    assert folded.startswith(b"Subject: =?utf-8?q?x")
    message = BytesParser(policy=policy.strict).parsebytes(folded + b"\r\n")
    assert str(message["Subject"]) == word


def test_an_ascii_display_name_is_quoted_with_its_quotes_and_backslashes_escaped() -> None:
    assert mailbox("From", 'The "Lake" \\ Clinic, LLC', "care@clinic.example") == (
        b'From: "The \\"Lake\\" \\\\ Clinic, LLC" <care@clinic.example>\r\n'
    )


def test_a_non_latin_display_name_is_base64_when_shorter_and_atoms_stay_plain() -> None:
    assert mailbox("From", "李小龍 醫療中心", "care@clinic.example") == (
        b"From: =?utf-8?b?5p2O5bCP6b6NIOmGq+eZguS4reW/gw==?= <care@clinic.example>\r\n"
    )
    assert mailbox("From", "Clínica Lakeside", "care@clinic.example") == (
        b"From: =?utf-8?q?Cl=C3=ADnica?= Lakeside <care@clinic.example>\r\n"
    )


@pytest.mark.parametrize(
    ("display_name", "address"),
    [
        ("Clinic\r\nBcc: a@evil.example", "care@clinic.example"),
        ("Clinic", "care@clinic.example\r\nBcc: a@evil.example"),
        ("Clinic", "care@clínica.example"),
        ("Clinic", "no-at-sign"),
    ],
)
def test_a_mailbox_that_would_break_its_header_is_refused(display_name: str, address: str) -> None:
    with pytest.raises(MessageError, match="From"):
        mailbox("From", display_name, address)
