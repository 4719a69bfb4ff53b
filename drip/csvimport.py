"""Enrolment CSVs: columns email,first_name,last_name,timezone,first_session.

One pass, streamed: each row is checked, and valid rows are handed on to be written in chunks
inside the caller's transaction. Once any row is bad (and --skip-invalid is not given) nothing more
is handed on, every remaining row is still checked so that all problems are reported, and the
caller rolls the transaction back: nothing is half-written, and memory stays flat.

Lines are numbered as an editor shows them, and rows are counted one per line: a quoted value that
runs over several lines is refused with each line it took. A quote never closed makes every later
row unknowable, so it refuses the whole file even with --skip-invalid. A byte that is not UTF-8
refuses the row on its own line; the other rows are still checked. The delimiter is a comma, or
what an Excel `sep=` first line says, or a semicolon when the header has semicolons and no comma
(Excel's "CSV" in locales with a decimal comma): a drip header holds column names only, so that
is never ambiguous.

Rows whose address is suppressed (the patient unsubscribed, a hard bounce, a coordinator's
`drip suppress`) are not bad rows: they are left out, listed by line with the reason, and counted
apart (`CsvReport.suppressed`); the rest are enrolled. The caller gives the lookup (`Suppressed`):
one query per CHUNK rows.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

from drip.clock import iso
from drip.errors import CsvError, InputError, RowProblem
from drip.patients import PatientInput, check_patient

COLUMNS = ("email", "first_name", "last_name", "timezone", "first_session")
REQUIRED = ("email", "first_name")
SAVE_AS = 'save it from Excel as "CSV UTF-8 (Comma delimited)"'
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as surrogateescape keeps it
_SEP = re.compile(r'"?sep=(.)"?', re.IGNORECASE)  # Excel's first line naming the delimiter
CHUNK = 500  # rows per suppression lookup
# The suppressed among some email keys, each with its reason and since when.
Suppressed = Callable[[list[str]], Mapping[str, tuple[str, datetime]]]


@dataclass(frozen=True)
class LeftOut:
    """A row not enrolled because its address is suppressed (not a bad row)."""

    line: int
    reason: str
    since: datetime

    def __str__(self) -> str:
        return f"line {self.line}: suppressed since {self.since:%Y-%m-%d} ({self.reason})"

    def as_json(self) -> dict[str, object]:
        return {"line": self.line, "reason": self.reason, "since": iso(self.since)}


@dataclass
class CsvReport:
    """What reading a CSV found: how many rows, and every problem with its line."""

    rows: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    bad_rows: int = 0
    suppressed: list[LeftOut] = field(default_factory=list)

    def refuse(self, problems: list[RowProblem], rows: int = 1) -> None:
        self.bad_rows += rows
        self.problems.extend(problems)


def count_lines(path: Path) -> int:
    """Rough number of data rows, for a progress bar."""
    with path.open("rb") as f:
        return max(sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) - 1, 0)


def open_csv(path: Path) -> IO[str]:
    """The file, or standard input for "-", as UTF-8 text with any BOM dropped. A byte that is
    not UTF-8 is kept as a lone surrogate rather than raised, so that its row is named by its
    own line and the other rows are still checked."""
    if str(path) == "-":
        return io.TextIOWrapper(
            sys.stdin.buffer, encoding="utf-8-sig", errors="surrogateescape", newline=""
        )
    return path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")


def patients_from_csv(
    stream: IO[str],
    report: CsvReport,
    *,
    default_timezone: str,
    now: datetime,
    skip_invalid: bool,
    suppressed: Suppressed | None = None,
) -> Iterator[PatientInput]:
    """Yield each valid patient whose address is not `suppressed`; record every bad row and
    every suppressed one in `report`.

    After the first bad row nothing more is yielded unless `skip_invalid`."""
    checked = _checked(stream, report, default_timezone, now)
    if suppressed is not None:
        checked = _leave_out(checked, report, suppressed)
    for _, patient in checked:
        if skip_invalid or not report.problems:
            yield patient


def _leave_out(
    checked: Iterable[tuple[int, PatientInput]], report: CsvReport, suppressed: Suppressed
) -> Iterator[tuple[int, PatientInput]]:
    """The rows whose address is not suppressed, looked up CHUNK at a time."""
    chunk: list[tuple[int, PatientInput]] = []
    for item in checked:
        chunk.append(item)
        if len(chunk) == CHUNK:
            yield from _without_suppressed(chunk, report, suppressed)
            chunk = []
    yield from _without_suppressed(chunk, report, suppressed)


def _without_suppressed(
    chunk: list[tuple[int, PatientInput]], report: CsvReport, suppressed: Suppressed
) -> list[tuple[int, PatientInput]]:
    if not chunk:
        return []
    found = suppressed([patient.email_key for _, patient in chunk])
    report.suppressed.extend(
        LeftOut(line, *found[p.email_key]) for line, p in chunk if p.email_key in found
    )
    return [(line, p) for line, p in chunk if p.email_key not in found]


def _checked(
    stream: IO[str], report: CsvReport, default_timezone: str, now: datetime
) -> Iterator[tuple[int, PatientInput]]:
    """Each valid row's first line and patient; every bad row recorded in `report`."""
    seen: dict[str, int] = {}
    for first, last, fields in _records(_Lines(stream), report):
        report.rows += last - first + 1
        if isinstance(fields, list):
            report.refuse(fields, last - first + 1)
            continue
        result = check_patient(fields, default_timezone=default_timezone, now=now)
        if isinstance(result, list):
            report.refuse([RowProblem(first, e.field, e.reason) for e in result])
            continue
        first_line = seen.setdefault(result.email_key, first)
        if first_line != first:
            report.refuse([RowProblem(first, "email", f"same address as line {first_line}")])
            continue
        yield first, result


class _Lines:
    """The lines of a text stream (split at \\n, \\r\\n or \\r), numbered as an editor numbers
    them; `number` is the last one read. Notes each line holding a byte that is not UTF-8."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = iter(stream)
        self.number = 0
        self.done = False
        self.not_utf8: dict[int, int] = {}  # line → its first byte that is not UTF-8

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        try:
            line = next(self._stream)
        except StopIteration:
            self.done = True
            raise
        self.number += 1
        if bad := _NOT_UTF8.search(line):
            self.not_utf8[self.number] = ord(bad.group()) - 0xDC00
        return line

    def encoding_problems(self, first: int, last: int) -> list[RowProblem]:
        return [
            RowProblem(n, "text", f"is not UTF-8 (byte 0x{self.not_utf8.pop(n):02X}); {SAVE}")
            for n in range(first, last + 1)
            if n in self.not_utf8
        ]


SAVE = "save the file as CSV UTF-8"


def _records(
    lines: _Lines, report: CsvReport
) -> Iterator[tuple[int, int, dict[str, str] | list[RowProblem]]]:
    """Each non-blank row: its first and last line, and its fields or its problems."""
    delimiter, header = _header(lines)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    while True:
        first = lines.number + 1
        try:
            values = next(reader, None)
        except csv.Error as e:
            if lines.done or lines.number > first:
                _refuse_the_file(report, first, lines.number, str(e), at_end=lines.done)
            yield first, first, [RowProblem(first, "row", f"{e}; check the quoting")]
            continue
        if values is None:
            return
        last = lines.number
        if not any(v.strip() for v in values):
            continue
        problems = lines.encoding_problems(first, last)
        if last > first:
            problems.insert(0, RowProblem(first, "row", _runs_on(first, last)))
        yield first, last, problems or _fields(header, values, first)


def _runs_on(first: int, last: int) -> str:
    return (
        f"lines {first}-{last} are one row: a quoted value holds line breaks, which no column "
        f"may; check the quotes on line {first}"
    )


def _refuse_the_file(report: CsvReport, first: int, last: int, error: str, *, at_end: bool) -> None:
    """A quote opened on line `first` is never closed (or is broken on line `last`): every line
    after it may belong to it, so no row after it can be trusted."""
    if at_end:
        what = f"a quote opens on this line and is never closed, so lines {first}-{last} read as"
    else:
        what = f"a quote opens on this line and breaks on line {last} ({error}), so lines"
        what += f" {first}-{last} read as"
    report.rows += last - first + 1
    report.bad_rows = report.rows
    reason = (
        f"{what} one value and the rows on them cannot be told apart; "
        f"close the quote on line {first} (or remove it)"
    )
    problem = RowProblem(first, "csv", reason)
    raise CsvError([problem], report.rows, whole_file=True)


def _header(lines: _Lines) -> tuple[str, list[str]]:
    """The delimiter and the column names, from the first line (or the one after `sep=`)."""
    line = next(lines, None)
    sep = _SEP.fullmatch(line.strip()) if line else None
    if sep:
        line = next(lines, None)
    if not line or not line.strip():
        where = f"line {lines.number} is blank" if line else "the file is empty"
        raise InputError("csv", f"{where}; the first line must be: {','.join(COLUMNS)}")
    if lines.not_utf8:
        raise InputError("csv header", f"line {lines.number} is not UTF-8 text; {SAVE}")
    delimiter = sep.group(1) if sep else ";" if ";" in line and "," not in line else ","
    names = next(csv.reader([line], delimiter=delimiter))
    return delimiter, _columns([name.strip().lower() for name in names], lines.number)


def _columns(header: list[str], line: int) -> list[str]:
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        raise InputError(
            "csv header",
            f"unknown column(s) {', '.join(map(repr, unknown))} on line {line}; "
            f"the columns are {','.join(COLUMNS)}" + _delimiter_hint(unknown),
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise InputError(
            "csv header", f"column(s) {', '.join(repeated)} appear twice on line {line}"
        )
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise InputError(
            "csv header", f"line {line} lacks the column(s) {', '.join(missing)}; they are required"
        )
    return header


def _delimiter_hint(unknown: list[str]) -> str:
    for char, name in ((";", "semicolons (;)"), ("\t", "tabs")):
        if any(char in u for u in unknown):
            return f"; the file seems to use {name} between values: {SAVE_AS}"
    return ""


def _fields(header: list[str], values: list[str], line: int) -> dict[str, str] | list[RowProblem]:
    if len(values) > len(header):
        reason = (
            f"has {len(values)} fields but the header has {len(header)}; "
            "quote any value that contains a comma"
        )
        return [RowProblem(line, "row", reason)]
    return dict(zip(header, values, strict=False))
