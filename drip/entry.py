"""The `drip` command's entry point: Ctrl-C while the program is still loading (importing the
CLI, Celery and SQLAlchemy takes a few tenths of a second) is one line and exit 130, as it is
once a command runs (drip.cli handles it there)."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from drip.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    run()
