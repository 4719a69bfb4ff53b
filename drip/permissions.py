"""Patients' names and addresses are for the owner only: the SQLite database (and its -wal and
-shm files, which SQLite makes with the database's own mode), var/ and the outbox are created
0600 or 0700, whatever the umask. Looser ones made before are left alone, and listed by
loose_permissions() with the fix.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    from drip.settings import Settings

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def private_folder(path: Path) -> None:
    """Make `path` and each missing folder above it, 0700 (a mode the umask can only narrow)."""
    missing: list[Path] = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=FOLDER_MODE)
        except FileExistsError:
            pass


def private_file(path: Path) -> None:
    """Create `path` empty and 0600 unless it exists (an empty file is a new SQLite database)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass


def loose_permissions(settings: Settings) -> list[str]:
    """One line for each file or folder of patients' data that other users can open, with the
    command that fixes it."""
    problems = []
    for path, wanted in _private_paths(settings):
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if mode & 0o077:
            problems.append(
                f"{path} can be read by other users ({stat.filemode(mode)}): "
                f"chmod {wanted:o} {shlex.quote(str(path))}"
            )
    return problems


def _private_paths(settings: Settings) -> list[tuple[Path, int]]:
    paths = [(settings.var_dir, FOLDER_MODE), (settings.var_dir / "secret_key", FILE_MODE)]
    database = sqlite_file(settings.database_url)
    if database is not None:
        paths += [(Path(f"{database}{end}"), FILE_MODE) for end in ("", "-wal", "-shm")]
    if settings.mail_url.startswith("file:"):
        from drip.transports import open_transport
        from drip.transports.file import FileTransport

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
