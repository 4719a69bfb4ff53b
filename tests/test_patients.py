from __future__ import annotations

from datetime import UTC, date, datetime, time

import pytest

from drip.errors import InputError
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
        "josé@example.com",
    ],
)
def test_a_bad_address_is_refused_with_the_field_named(raw: str) -> None:
    with pytest.raises(InputError) as caught:
        check_email(raw)
    assert caught.value.field == "email"


def test_no_dns_look_up_is_made_for_an_address() -> None:
    # this domain does not exist; syntax alone decides.
    assert check_email("ana@no-such-domain-7f3a9.com") == "ana@no-such-domain-7f3a9.com"


@pytest.mark.parametrize("name", ["Ana", "O'Brien", "Zoë", "José-María", "李小龙", "A" * 100])
def test_good_names_pass(name: str) -> None:
    assert check_name(name, "first_name", required=True) == name


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
        ("Ana\u2028Lee", "control"),
        ("<b>Ana</b>", "cannot contain"),
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
    assert check_first_session("", tz, NOW) is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("03/11/2026", "not a date"),
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
