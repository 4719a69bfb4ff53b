"""Checks of an installation, each a line saying what is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from drip.permissions import FILE_MODE, FOLDER_MODE, loose
from drip.settings import Settings
from drip.transports import open_transport
from drip.transports.file import FileTransport


def loose_permissions(settings: Settings) -> list[str]:
    """One line for each file or folder of patients' data that other users can open, with the
    command that fixes it."""
    found = (loose(path, wanted) for path, wanted in _private_paths(settings))
    return [problem for problem in found if problem]


def _private_paths(settings: Settings) -> list[tuple[Path, int]]:
    paths = [(settings.var_dir, FOLDER_MODE), (settings.var_dir / "secret_key", FILE_MODE)]
    database = sqlite_file(settings.database_url)
    if database is not None:
        paths += [(Path(f"{database}{end}"), FILE_MODE) for end in ("", "-wal", "-shm")]
    transport = open_transport(settings.mail_url)
    if isinstance(transport, FileTransport):
        paths.append((transport.directory, FOLDER_MODE))
    return list(dict.fromkeys(paths))


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for PostgreSQL, an in-memory database or a `file:` URI."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return None if database.startswith("file:") else Path(database)
