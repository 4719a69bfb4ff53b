"""Patients' names and addresses are for the owner only: the SQLite database (and its -wal and
-shm files, which SQLite makes with the database's own mode), var/ and the outbox are created
0600 or 0700, whatever the umask. Looser ones made before are left alone; drip.doctor lists them
with the fix.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

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


def loose(path: Path, wanted: int) -> str | None:
    """What is wrong with `path` if other users can open it, and the command that fixes it."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"{path} can be read by other users ({stat.filemode(mode)}): "
        f"chmod {wanted:o} {shlex.quote(str(path))}"
    )
