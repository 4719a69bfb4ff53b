"""Printing for people (tables) and for scripts (JSON).

Every value shown through rich is plain text: the console reads no markup and no emoji codes
(a relay's reply such as `554 [/spam] [link=http://…]help[/link]` would crash it, or become a
link in the operator's terminal), and each cell is a Text with unprintable characters (escape
sequences, bidirectional overrides) written as Python escapes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text


def console(*, stderr: bool = False) -> Console:
    out = Console(stderr=stderr, highlight=False, markup=False, emoji=False)
    if not out.is_terminal:
        out.width = 200  # piped: no terminal to wrap for
    return out


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def plain(value: Any) -> Text:
    """`value` as text that shows exactly what it holds."""
    shown = str(value)
    if not shown.isprintable():
        shown = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode() for c in shown
        )
    return Text(shown)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    out = Table(box=None, header_style="bold", pad_edge=False)
    for header in headers:
        out.add_column(plain(header))
    for row in rows:
        out.add_row(*(plain(cell) for cell in row))
    console().print(out)
