"""`drip enroll --csv`: every row checked, all or nothing, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import Engine, func, select

from drip.models import Delivery, Enrolment, Event, Patient

Drip = Callable[..., Result]
HEADER = "email,first_name,last_name,timezone,first_session\n"


def csv_file(tmp_path: Path, body: str, *, header: str = HEADER, encoding: str = "utf-8") -> str:
    path = tmp_path / "patients.csv"
    path.write_bytes((header + body).encode(encoding))
    return str(path)


def enroll_csv(drip: Drip, path: str, *extra: str) -> Result:
    return drip("enroll", "--csv", path, "--campaign", "ketamine-onboarding", *extra)


def counts(engine: Engine) -> tuple[int, int, int, int]:
    with engine.connect() as c:
        return tuple(  # type: ignore[return-value]
            c.scalar(select(func.count()).select_from(t))
            for t in (Patient, Enrolment, Delivery, Event)
        )


GOOD = (
    "ana@example.com,Ana,López,America/New_York,2026-11-05\n"
    "ben@example.com,Ben,,Europe/London,\n"
    "chloé@example.com,Chloé,O'Neil,,2026-11-06T15:30\n"
).replace("chloé@", "chloe@")


def test_a_good_csv_enrols_everyone_and_sums_up(drip: Drip, engine: Engine, tmp_path: Path) -> None:
    result = enroll_csv(drip, csv_file(tmp_path, GOOD))
    assert result.exit_code == 0, result.output
    assert "enrolled 3, already enrolled 0, refused 0 (of 3 rows)" in result.stdout
    assert counts(engine) == (3, 3, 24, 3)
    again = enroll_csv(drip, csv_file(tmp_path, GOOD), "--json")
    assert json.loads(again.stdout) == {
        "rows": 3,
        "enrolled": 0,
        "already_enrolled": 3,
        "refused": 0,
        "problems": [],
    }


def test_a_csv_renews_the_names_and_zones_of_returning_patients_only(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    assert enroll_csv(drip, csv_file(tmp_path, GOOD)).exit_code == 0
    for email in ("ana@example.com", "ben@example.com"):
        assert drip("unenroll", email).exit_code == 0
    renamed = (
        "ana@example.com,Ana María,López,Europe/Madrid,\n"
        "ben@example.com,Benjamin,Okafor,America/Chicago,\n"
        "chloe@example.com,Chloe,Smith,Asia/Tokyo,\n"
    )
    result = enroll_csv(drip, csv_file(tmp_path, renamed), "--json")
    assert json.loads(result.stdout)["enrolled"] == 2, result.output
    with engine.connect() as c:
        rows = c.execute(
            select(Patient.email, Patient.first_name, Patient.last_name, Patient.timezone)
        ).all()
    assert sorted(rows) == [  # one UPDATE for both returning patients; Chloé is still enrolled
        ("ana@example.com", "Ana María", "López", "Europe/Madrid"),
        ("ben@example.com", "Benjamin", "Okafor", "America/Chicago"),
        ("chloe@example.com", "Chloé", "O'Neil", "America/New_York"),
    ]


def test_a_blank_timezone_is_the_clinics(drip: Drip, engine: Engine, tmp_path: Path) -> None:
    assert enroll_csv(drip, csv_file(tmp_path, GOOD)).exit_code == 0
    with engine.connect() as c:
        zones = dict(c.execute(select(Patient.first_name, Patient.timezone)).all())
    assert zones == {"Ana": "America/New_York", "Ben": "Europe/London", "Chloé": "America/New_York"}


BAD = (
    "ana@example.com,Ana,,,\n"  # line 2: fine
    "not-an-address,Ben,,,\n"  # line 3: email
    "cara@example.com,,,Mars/Base,\n"  # line 4: first_name and timezone
    "ana@EXAMPLE.com,Ana,,,\n"  # line 5: same address as line 2
    "dan@example.com,Dan,,,2020-01-01\n"  # line 6: first_session too old
    "eve@example.com,Eve\x07,,,\n"  # line 7: control character
    "fay@example.com,Fay,,,,extra\n"  # line 8: too many fields
    "gus@example.com,Gus,,,\n"  # line 9: fine
)


def test_any_bad_row_lists_every_problem_and_writes_nothing(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    result = enroll_csv(drip, csv_file(tmp_path, BAD))
    assert result.exit_code == 1
    err = result.stderr
    assert "6 row(s) refused, nothing was written" in err
    assert "line 3: email:" in err
    assert "line 4: first_name: is empty" in err and "line 4: timezone:" in err
    assert "line 5: email: same address as line 2" in err
    assert "line 6: first_session:" in err and "30 days ago" in err
    assert "line 7: first_name: contains a control character" in err
    assert "line 8: row: has 6 fields but the header has 5" in err
    assert "line 2" not in err.replace("as line 2", "") and "line 9" not in err
    assert "--skip-invalid" in err and "Traceback" not in result.output
    assert counts(engine) == (0, 0, 0, 0)


def test_skip_invalid_enrols_the_good_rows_and_lists_the_rest(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    result = enroll_csv(drip, csv_file(tmp_path, BAD), "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "enrolled 2, already enrolled 0, refused 6 (of 8 rows)" in result.stdout
    assert "refused line 3: email:" in result.stderr
    assert counts(engine)[:3] == (2, 2, 16)


def test_a_bad_row_after_many_good_ones_still_writes_nothing(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    body = "".join(f"p{i}@example.com,P{i},,,\n" for i in range(2500)) + "oops,X,,,\n"
    result = enroll_csv(drip, csv_file(tmp_path, body))
    assert result.exit_code == 1 and "line 2502: email:" in result.stderr
    assert counts(engine) == (0, 0, 0, 0)


def test_a_utf8_bom_and_column_order_and_case_are_accepted(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffFirst_Name, Email\r\nZoë,zoe@example.com\r\n".encode())
    result = enroll_csv(drip, str(path))
    assert result.exit_code == 0, result.output
    with engine.connect() as c:
        assert c.execute(select(Patient.first_name, Patient.email)).one() == (
            "Zoë",
            "zoe@example.com",
        )


def test_quoted_fields_and_blank_lines_are_handled(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    body = '"ana@example.com","Ana, Jr.",,,\n\n"ben@example.com",Ben,,,\n'
    result = enroll_csv(drip, csv_file(tmp_path, body))
    assert result.exit_code == 0, result.output
    assert "enrolled 2" in result.stdout


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("email,first_name,phone\n", "unknown column(s) 'phone' on line 1"),
        ("email,last_name\n", "lacks the column(s) first_name"),
        ("email,first_name,email\n", "email appear twice"),
        ("", "the file is empty"),
    ],
)
def test_a_bad_header_is_refused(
    drip: Drip, engine: Engine, tmp_path: Path, header: str, message: str
) -> None:
    result = enroll_csv(drip, csv_file(tmp_path, "", header=header))
    assert result.exit_code == 1 and message in result.stderr
    assert counts(engine) == (0, 0, 0, 0)


def test_a_file_that_is_not_utf8_is_refused(drip: Drip, engine: Engine, tmp_path: Path) -> None:
    path = csv_file(tmp_path, "ana@example.com,Zoë,,,\n", encoding="latin-1")
    result = enroll_csv(drip, path)
    assert result.exit_code == 1 and "not UTF-8" in result.stderr and "CSV UTF-8" in result.stderr
    assert counts(engine) == (0, 0, 0, 0)


def test_a_missing_file_is_a_clear_error(drip: Drip, tmp_path: Path) -> None:
    result = enroll_csv(drip, str(tmp_path / "nope.csv"))
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_csv_and_a_single_patient_cannot_be_mixed(drip: Drip, tmp_path: Path) -> None:
    result = drip(
        "enroll",
        "a@example.com",
        "--csv",
        csv_file(tmp_path, GOOD),
        "--campaign",
        "ketamine-onboarding",
    )
    assert result.exit_code == 2


def test_csv_from_stdin(drip: Drip, engine: Engine) -> None:
    result = drip("enroll", "--csv", "-", "--campaign", "ketamine-onboarding", input=HEADER + GOOD)
    assert result.exit_code == 0, result.output
    assert counts(engine)[0] == 3
