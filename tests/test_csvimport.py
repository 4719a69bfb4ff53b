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
        "suppressed": 0,
        "suppressed_lines": [],
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


THREE_GOOD = "a1@example.com,A\na2@example.com,B\na3@example.com,C\n"


@pytest.mark.parametrize("skip", [(), ("--skip-invalid",)], ids=["all-or-nothing", "skip-invalid"])
def test_an_unclosed_quote_refuses_the_whole_file_naming_its_line(
    drip: Drip, engine: Engine, tmp_path: Path, skip: tuple[str, ...]
) -> None:
    body = 'uq1@example.com,"Ann\n' + THREE_GOOD  # the quote on line 2 swallows lines 3-5
    result = enroll_csv(drip, csv_file(tmp_path, body, header="email,first_name\n"), *skip)
    assert result.exit_code == 1, result.output
    err = result.stderr
    assert "the whole file was refused, nothing was written" in err
    assert "line 2: " in err and "never closed" in err and "lines 2-5" in err
    assert "close the quote on line 2" in err and "Ann" not in err
    assert "Traceback" not in result.output
    assert counts(engine) == (0, 0, 0, 0)


def test_a_quote_closed_lines_later_refuses_each_line_it_swallowed(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    body = 'uq1@example.com,"Ann\na1@example.com,A"\na2@example.com,B\n'
    path = csv_file(tmp_path, body, header="email,first_name\n")
    result = enroll_csv(drip, path, "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "enrolled 1, already enrolled 0, refused 2 (of 3 rows)" in result.stdout
    assert "refused line 2: row: lines 2-3 are one row" in result.stderr
    assert counts(engine)[:2] == (1, 1)


def test_a_bad_byte_is_named_by_its_own_line_and_every_other_bad_row_is_listed(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "patients.csv"
    path.write_bytes(b"email,first_name\nb@example.com,Zo\xeb\nc@example.com,C\nnot-an-address,X\n")
    result = enroll_csv(drip, str(path))
    assert result.exit_code == 1, result.output
    err = result.stderr
    assert "2 row(s) refused" in err
    assert "line 2: text: is not UTF-8 (byte 0xEB); save the file as CSV UTF-8" in err
    assert "line 4: email:" in err and "line 3" not in err
    assert counts(engine) == (0, 0, 0, 0)


def test_a_late_bad_byte_after_multi_line_values_is_named_by_its_true_line(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    multi = "".join(f'q{i}@example.com,"Q\nQ"\n' for i in range(10))  # lines 2-21, 10 rows
    good = "".join(f"p{i}@example.com,P{i}\n" for i in range(4980))  # lines 22-5001
    path = tmp_path / "patients.csv"
    path.write_bytes(
        b"email,first_name\n"
        + (multi + good).encode()
        + b"late@example.com,Zo\xeb\n"  # line 5002
        + b"oops,X\n"  # line 5003
    )
    result = enroll_csv(drip, str(path))
    assert result.exit_code == 1, result.output
    err = result.stderr
    assert "line 5002: text: is not UTF-8 (byte 0xEB)" in err
    assert "line 5003: email:" in err
    assert "line 2: row: lines 2-3 are one row" in err and "line 20: row: lines 20-21" in err
    assert "22 row(s) refused" in err  # rows are counted as lines: 10 two-line rows and 2
    assert counts(engine) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("text", "bad_line"),
    [
        ("email;first_name\nx@example.com;X\ny@example.com;Y\noops;Z\n", 4),
        ('sep=;\nemail;first_name\nx@example.com;X\ny@example.com;"Y; Jr"\noops;Z\n', 5),
        ("sep=,\nemail,first_name\nx@example.com,X\ny@example.com,Y\noops,Z\n", 5),
    ],
    ids=["semicolons", "sep-semicolon", "sep-comma"],
)
def test_semicolons_and_an_excel_sep_line_are_read_as_excel_reads_them(
    drip: Drip, engine: Engine, tmp_path: Path, text: str, bad_line: int
) -> None:
    result = enroll_csv(drip, csv_file(tmp_path, text, header=""), "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "enrolled 2, already enrolled 0, refused 1 (of 3 rows)" in result.stdout
    assert f"refused line {bad_line}: email:" in result.stderr
    assert counts(engine)[:2] == (2, 2)


def test_a_header_that_mixes_delimiters_gets_a_hint(drip: Drip, tmp_path: Path) -> None:
    result = enroll_csv(
        drip, csv_file(tmp_path, "x@example.com;X,\n", header="email;first_name,last_name\n")
    )
    assert result.exit_code == 1
    assert "semicolons" in result.stderr and "CSV UTF-8 (Comma delimited)" in result.stderr


def test_json_with_bad_rows_lists_them_as_json_and_exits_1(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    result = enroll_csv(drip, csv_file(tmp_path, BAD), "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["rows"] == 8 and out["refused"] == 6
    assert out["enrolled"] == 0 and out["already_enrolled"] == 0
    assert out["error"] == "6 row(s) refused, nothing was written"
    assert {"line": 3, "field": "email"}.items() <= out["problems"][0].items()
    assert [p["line"] for p in out["problems"]] == [3, 4, 4, 5, 6, 7, 8]
    assert counts(engine) == (0, 0, 0, 0)


def test_json_with_an_unclosed_quote_says_so_as_json(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    body = 'uq1@example.com,"Ann\n' + THREE_GOOD
    path = csv_file(tmp_path, body, header="email,first_name\n")
    result = enroll_csv(drip, path, "--json", "--skip-invalid")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["error"] == "the whole file was refused, nothing was written"
    assert out["rows"] == 4 and out["refused"] == 4 and out["enrolled"] == 0
    assert [(p["line"], p["field"]) for p in out["problems"]] == [(2, "csv")]
    assert counts(engine) == (0, 0, 0, 0)


def test_a_quote_that_breaks_lines_later_refuses_the_file_and_on_one_line_only_its_row(
    drip: Drip, engine: Engine, tmp_path: Path
) -> None:
    runaway = 'uq1@example.com,"Ann\na1@example.com,A\na2@example.com,"B"x\n'
    result = enroll_csv(drip, csv_file(tmp_path, runaway, header="email,first_name\n"))
    assert result.exit_code == 1
    assert "line 2: csv: a quote opens on this line and breaks on line 4" in result.stderr
    one_line = 'a1@example.com,"A"x\na2@example.com,B\n'
    path = csv_file(tmp_path, one_line, header="email,first_name\n")
    result = enroll_csv(drip, path, "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "refused line 2: row: ',' expected after '\"'; check the quoting" in result.stderr
    assert "enrolled 1, already enrolled 0, refused 1 (of 2 rows)" in result.stdout
