from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, time
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import Engine, func, select

from drip.errors import InputError
from drip.models import Patient
from drip.patients import (
    PatientInput,
    check_email,
    check_first_session,
    check_name,
    check_patient,
    check_timezone,
)
from drip.planning import FirstSession

NOW = datetime(2026, 10, 30, 14, 0, tzinfo=UTC)


def test_an_address_keeps_its_local_part_and_normalises_its_domain() -> None:
    assert check_email("  Ana.Lopez@Example.COM ") == "Ana.Lopez@example.com"


def test_an_international_domain_is_stored_in_its_ascii_form() -> None:
    assert check_email("ana@bücher.example") == "ana@xn--bcher-kva.example"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "ana",
        "ana@",
        "@example.com",
        "ana@@example.com",
        "ana@example..com",
        "ana lopez@example.com",
        "ana@example.com\r\nBcc: x@y.z",
        "x\r\nBcc: a@evil.example",
        "ana@example.com\n",
        "ana@example.com\u2028",
        "ana@example.com\x85",
        "=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?=@example.com",
        "=?utf-8?q?x?=@example.com",
        "josé@example.com",
    ],
)
def test_a_bad_address_is_refused_with_the_field_named(raw: str) -> None:
    with pytest.raises(InputError) as caught:
        check_email(raw)
    assert caught.value.field == "email"


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("ana@example.com\n", "U+000A (LINE FEED)"),
        ("ana@example.com\r\nBcc: a@evil.example", "U+000D (CARRIAGE RETURN)"),
        ("=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?=@example.com", "RFC 2047 encoded word"),
    ],
)
def test_an_address_that_could_break_the_to_header_names_the_character(raw: str, says: str) -> None:
    with pytest.raises(InputError) as caught:
        check_email(raw)
    assert caught.value.field == "email" and says in caught.value.reason
    assert "one line" in caught.value.reason


def test_no_dns_look_up_is_made_for_an_address() -> None:
    # this domain does not exist; syntax alone decides.
    assert check_email("ana@no-such-domain-7f3a9.com") == "ana@no-such-domain-7f3a9.com"


@pytest.mark.parametrize(
    "name",
    [
        "Ana",
        "O'Brien",
        "Zoë",
        "José-María",
        "李小龙",
        "Nguyễn",
        "A" * 100,
        "\u0645\u06cc\u200c\u0646\u0627",  # Persian: a ZWNJ between two Arabic letters
        "\u0915\u094d\u200d\u0937",  # Devanagari: a ZWJ after a virama (a half form)
    ],
)
def test_good_names_pass(name: str) -> None:
    assert check_name(name, "first_name", required=True) == name


def test_spaces_around_a_name_are_dropped_of_any_width() -> None:
    assert check_name(" \u00a0Zoë\u3000 ", "first_name", required=True) == "Zoë"


def test_a_name_typed_with_a_combining_accent_is_stored_composed() -> None:
    assert check_name("Zoe\u0308", "first_name", required=True) == "Zoë"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("Ana\u202eeeL", "U+202E"),  # right-to-left override: shows as "AnaLee" reversed
        ("Ana\u200bLee", "U+200B"),  # zero width space
        ("\ufeffAna", "U+FEFF"),  # a byte-order mark pasted at the start
        ("Ana\U000e0041\U000e0042", "U+E0041"),  # tag characters: invisible text
        ("Ana\u2066Lee", "U+2066"),  # left-to-right isolate
        ("Ana\ue000", "U+E000"),  # private use
        ("Ana\u0378", "U+0378"),  # unassigned
        ("Ana\ud800", "U+D800"),  # a lone surrogate
        ("\u200dAna", "U+200D"),  # a joiner with nothing to join
        ("Ana\u200c", "U+200C"),
        ("Ana \u200cLee", "U+200C"),
    ],
)
def test_invisible_and_format_characters_are_refused_by_code_point(name: str, code: str) -> None:
    with pytest.raises(InputError) as caught:
        check_name(name, "last_name", required=True)
    reason = caught.value.reason
    assert caught.value.field == "last_name" and code in reason and "remove it" in reason
    assert reason.isascii()  # named as U+XXXX, never echoed raw


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("A" * 101, "shorten"),
        ("Ana\nBcc", "control"),
        ("Ana\rX", "control"),
        ("Ana\x00", "control"),
        ("Ana\tLee", "control"),
        ("Ana\x1b[31m", "control"),
        ("Ana\u2028Lee", "line break"),
        ("<b>Ana</b>", "cannot contain"),
        ("x\r\nBcc: a@evil.example", "U+000D (CARRIAGE RETURN)"),
        ("Ana\n", "U+000A (LINE FEED)"),
        ("Ana\r\n", "U+000D"),
        ("\nAna", "U+000A"),
        ("Ana\u2029", "U+2029"),
        ("Ana\x85", "U+0085 (NEXT LINE)"),
        ("=?utf-8?q?x=0D=0ABcc:_a@evil?=", "encoded word"),
        ("=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?=", "encoded word"),
    ],
)
def test_bad_names_are_refused_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(InputError) as caught:
        check_name(name, "first_name", required=True)
    assert caught.value.field == "first_name" and reason in caught.value.reason


def test_a_last_name_may_be_blank() -> None:
    assert check_name("", "last_name", required=False) is None


def test_a_blank_zone_is_the_clinics_and_a_bad_zone_is_refused() -> None:
    assert check_timezone("", "America/New_York") == "America/New_York"
    assert check_timezone("Europe/London", "America/New_York") == "Europe/London"
    for bad in ("Mars/Olympus", "EST+5", "../../etc/passwd"):
        with pytest.raises(InputError, match="IANA"):
            check_timezone(bad, "America/New_York")


@pytest.mark.parametrize(
    "bad", ["localtime", "Factory", "posixrules", "posix/Asia/Tokyo", "right/America/New_York"]
)
def test_zone_files_that_are_not_iana_zones_are_refused(bad: str) -> None:
    with pytest.raises(InputError) as caught:
        check_timezone(bad, "America/New_York")
    assert caught.value.field == "timezone" and "Area/City" in caught.value.reason


@pytest.mark.parametrize("good", ["US/Eastern", "UTC", "Etc/GMT+5", "Asia/Kolkata"])
def test_legacy_iana_names_are_still_zones(good: str) -> None:
    assert check_timezone(good, "America/New_York") == good


def test_a_zone_in_the_wrong_case_is_refused_with_its_spelling() -> None:
    with pytest.raises(InputError, match="'Europe/London'"):
        check_timezone("europe/london", "America/New_York")


def test_a_first_session_is_a_date_or_a_date_time_in_the_patients_zone() -> None:
    tz = "America/Chicago"
    assert check_first_session("2026-11-03", tz, NOW) == FirstSession(date(2026, 11, 3))
    assert check_first_session("2026-11-03T14:30", tz, NOW) == FirstSession(
        date(2026, 11, 3), time(14, 30)
    )
    assert check_first_session("2026-11-03 14:30", tz, NOW) == FirstSession(
        date(2026, 11, 3), time(14, 30)
    )
    # an explicit offset is converted into the patient's zone (UTC-6 in November)
    assert check_first_session("2026-11-03T20:30+00:00", tz, NOW) == FirstSession(
        date(2026, 11, 3), time(14, 30)
    )
    assert check_first_session("2026-11-03T14:30:00", tz, NOW) == FirstSession(
        date(2026, 11, 3), time(14, 30)
    )
    assert check_first_session("2026-11-03T20:30Z", tz, NOW) == FirstSession(
        date(2026, 11, 3), time(14, 30)
    )
    assert check_first_session("", tz, NOW) is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("03/11/2026", "not a date"),
        ("20261203", "not a date"),
        ("2026-W49-4", "not a date"),
        ("2026-337", "not a date"),
        ("2026-12-03T14", "not a date"),
        ("2026-12-03T1430", "not a date"),
        ("2026-12-03T14:30:00.5", "not a date"),
        ("2026-13-01", "not a date"),
        ("next week", "not a date"),
        ("2026-09-29", "30 days ago"),
        ("2027-11-01", "a year ahead"),
    ],
)
def test_a_bad_first_session_is_refused(raw: str, reason: str) -> None:
    with pytest.raises(InputError) as caught:
        check_first_session(raw, "America/New_York", NOW)
    assert caught.value.field == "first_session" and reason in caught.value.reason


def test_a_first_session_up_to_30_days_ago_is_accepted() -> None:
    assert check_first_session("2026-10-01", "America/New_York", NOW) is not None


def test_check_patient_reports_every_bad_field_at_once() -> None:
    problems = check_patient(
        {"email": "nope", "first_name": "", "timezone": "Nowhere"},
        default_timezone="America/New_York",
        now=NOW,
    )
    assert isinstance(problems, list)
    assert [p.field for p in problems] == ["email", "first_name", "timezone"]


def test_check_patient_returns_the_clean_patient() -> None:
    patient = check_patient(
        {
            "email": "Ana@Example.com",
            "first_name": " Ana ",
            "last_name": "",
            "timezone": "",
            "first_session": "2026-11-05",
        },
        default_timezone="America/New_York",
        now=NOW,
    )
    assert patient == PatientInput(
        "Ana@example.com", "Ana", None, "America/New_York", FirstSession(date(2026, 11, 5))
    )
    assert patient.email_key == "ana@example.com"


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [
        ("--timezone", "right/America/New_York", "timezone"),
        ("--timezone", "localtime", "timezone"),
        ("--first-session", "20261203", "first_session"),
        ("--first-name", "Ana\u202eeeL", "first_name"),
    ],
)
def test_the_command_line_and_a_csv_refuse_the_same_values(
    drip: Callable[..., Result], engine: Engine, tmp_path: Path, option: str, value: str, field: str
) -> None:
    fields = {"--first-name": "Ana", "--timezone": "Europe/London", "--first-session": ""}
    fields[option] = value
    one = drip(
        "enroll", "ana@example.com", "--campaign", "ketamine-onboarding",
        *(part for name, given in fields.items() if given for part in (name, given)),
    )  # fmt: skip
    csv = tmp_path / "patients.csv"
    csv.write_text(
        "email,first_name,timezone,first_session\n"
        f"ana@example.com,{fields['--first-name']},{fields['--timezone']},"
        f"{fields['--first-session']}\n",
        encoding="utf-8",
    )
    many = drip("enroll", "--csv", str(csv), "--campaign", "ketamine-onboarding")
    for result in (one, many):
        assert result.exit_code == 1, result.output
        assert f"{field}:" in result.stderr and "Traceback" not in result.output
        assert "\u202e" not in result.output
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Patient)) == 0


INJECTIONS = [
    "x\r\nBcc: a@evil.example",
    "=?utf-8?q?x=0D=0ABcc:_a@evil.example?=",
    "=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?=",
    "Ana\n",
]


@pytest.mark.parametrize("payload", INJECTIONS)
@pytest.mark.parametrize("field", ["email", "first_name", "last_name"])
def test_header_injection_payloads_are_refused_by_the_command_line_and_a_csv(
    drip: Callable[..., Result], engine: Engine, tmp_path: Path, field: str, payload: str
) -> None:
    """Refused at input, with the field named and the fix, and nothing written: a name or an
    address that could hide a second recipient or a Bcc never reaches the database."""
    values = {"email": "ana@example.com", "first_name": "Ana", "last_name": "Lee"}
    values[field] = payload if field != "email" or "@" in payload else f"{payload}@example.com"
    one = drip(
        "enroll", values["email"], "--campaign", "ketamine-onboarding",
        "--first-name", values["first_name"], "--last-name", values["last_name"],
    )  # fmt: skip
    csv = tmp_path / "patients.csv"
    cells = ('"' + values[name].replace('"', '""') + '"' for name in values)
    csv.write_text("email,first_name,last_name\n" + ",".join(cells) + "\n", encoding="utf-8")
    many = drip("enroll", "--csv", str(csv), "--campaign", "ketamine-onboarding")
    for result in (one, many):
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
    assert f"{field}:" in one.stderr
    assert "remove it" in one.stderr or "encoded word" in one.stderr
    # a CSV row whose quoted value holds a line break is refused as a row, before any field
    assert "line 2" in many.stderr
    assert f"{field}:" in many.stderr or "holds line breaks" in many.stderr
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Patient)) == 0
