"""Enrolment CSVs: columns email,first_name,last_name,timezone,first_session.

One pass, streamed: each row is checked, and valid rows are handed on to be written in chunks
inside the caller's transaction. Once any row is bad (and --skip-invalid is not given) nothing more
is handed on, every remaining row is still checked so that all problems are reported, and the
caller rolls the transaction back: nothing is half-written, and memory stays flat.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

from drip.errors import InputError, RowProblem
from drip.patients import PatientInput, check_patient

COLUMNS = ("email", "first_name", "last_name", "timezone", "first_session")
REQUIRED = ("email", "first_name")


@dataclass
class CsvReport:
    """What reading a CSV found: how many rows, and every problem with its line."""

    rows: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    bad_rows: int = 0

    def refuse(self, line: int, errors: list[InputError]) -> None:
        self.bad_rows += 1
        self.problems.extend(RowProblem(line, e.field, e.reason) for e in errors)


def count_lines(path: Path) -> int:
    """Rough number of data rows, for a progress bar."""
    with path.open("rb") as f:
        return max(sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) - 1, 0)


def patients_from_csv(
    stream: IO[str],
    report: CsvReport,
    *,
    default_timezone: str,
    now: datetime,
    skip_invalid: bool,
) -> Iterator[PatientInput]:
    """Yield each valid patient; record every bad row in `report`.

    After the first bad row nothing more is yielded unless `skip_invalid`."""
    seen: dict[str, int] = {}
    for line, fields in _rows(stream):
        report.rows += 1
        if isinstance(fields, InputError):
            report.refuse(line, [fields])
            continue
        result = check_patient(fields, default_timezone=default_timezone, now=now)
        if isinstance(result, list):
            report.refuse(line, result)
            continue
        first_line = seen.setdefault(result.email_key, line)
        if first_line != line:
            report.refuse(line, [InputError("email", f"same address as line {first_line}")])
            continue
        if skip_invalid or not report.problems:
            yield result


def _rows(stream: IO[str]) -> Iterator[tuple[int, dict[str, str] | InputError]]:
    reader = csv.reader(stream)
    try:
        header = _header(next(reader, None))
        line = reader.line_num + 1
        for values in reader:
            if any(v.strip() for v in values):
                yield line, _fields(header, values)
            line = reader.line_num + 1
    except UnicodeDecodeError:
        raise InputError(
            "csv", f"line {reader.line_num + 1} is not UTF-8 text; save the file as CSV UTF-8"
        ) from None
    except csv.Error as e:
        raise InputError("csv", f"line {reader.line_num}: {e}; check the quoting") from None


def _header(row: list[str] | None) -> list[str]:
    if not row:
        raise InputError("csv", f"the file is empty; the first line must be: {','.join(COLUMNS)}")
    header = [name.strip().lower() for name in row]
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        raise InputError(
            "csv header",
            f"unknown column(s) {', '.join(map(repr, unknown))} on line 1; "
            f"the columns are {','.join(COLUMNS)}",
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise InputError("csv header", f"column(s) {', '.join(repeated)} appear twice on line 1")
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise InputError(
            "csv header", f"line 1 lacks the column(s) {', '.join(missing)}; they are required"
        )
    return header


def _fields(header: list[str], values: list[str]) -> dict[str, str] | InputError:
    if len(values) > len(header):
        return InputError(
            "row",
            f"has {len(values)} fields but the header has {len(header)}; "
            "quote any value that contains a comma",
        )
    return dict(zip(header, values, strict=False))
