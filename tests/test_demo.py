"""`drip demo` read through a pipe (`./scripts/demo | cat`): each section on lines of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

COUNTS = re.compile(r"\s*(\d+\s+){6}\d+\s*")  # the status view's row: one count per state
HEADER = re.compile(r"\s*patient\s+step\s+state\s+local time\s*")


@pytest.mark.slow
def test_the_demo_piped_prints_plain_lines_each_section_apart(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DRIP_", "FORCE_COLOR"))}
    out = subprocess.run(
        [sys.executable, "-m", "drip", "demo", "--patients", "1"],
        cwd=tmp_path,
        env=env | {"TERM": "xterm-256color"},
        capture_output=True,  # stdout a pipe, as in `./scripts/demo | cat`
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "\x1b" not in out.stdout  # no colour or cursor codes in a pipe
    counts = [i for i, line in enumerate(lines) if COUNTS.fullmatch(line)]
    header = [i for i, line in enumerate(lines) if HEADER.fullmatch(line)]
    assert len(counts) == 1 and len(header) == 1, lines  # neither ran into the other
    assert counts[0] < header[0] and "" in lines[counts[0] + 1 : header[0]], lines
    assert any(line.startswith("enrolled 1 sample patient") for line in lines)
    assert lines[lines.index(next(x for x in lines if "emails delivered" in x)) - 1] == ""
    assert any("emails delivered" in x and "open in a browser" in x for x in lines), lines
