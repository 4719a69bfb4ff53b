"""Printing for people (tables) and for scripts (JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table


def console(*, stderr: bool = False) -> Console:
    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal:
        out.width = 200  # piped: no terminal to wrap for
    return out


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    out = Table(*headers, box=None, header_style="bold", pad_edge=False)
    for row in rows:
        out.add_row(*(str(cell) for cell in row))
    console().print(out)
