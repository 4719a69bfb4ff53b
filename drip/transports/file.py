"""A folder of .eml files: what DRIP_MAIL_URL=file://... gives, for demos and development."""

from __future__ import annotations

import itertools
import os
import secrets
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from drip.permissions import private_folder
from drip.transports import errors
from drip.transports.base import _Closing


class FileTransport(_Closing):
    """Writes each message to <directory>/<UTC timestamp>-<counter>-<random>.eml.

    The file appears whole or not at all (written under a temporary name in the same folder, then
    renamed), so a reader watching the folder never sees half a message. Files are private to the
    user (0600): they hold patient mail. The address never appears in a file name.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._counter = itertools.count(1)
        self._ready = False

    def __repr__(self) -> str:
        return f"FileTransport({str(self.directory)!r})"

    def send(
        self,
        envelope_from: str,
        recipient: str,
        message: bytes,
        *,
        before_content: Callable[[], None] | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> None:
        if before_content is not None:
            before_content()
        try:
            self._write(message)
        except OSError as e:
            raise errors.outbox_failed(self.directory, e) from e

    def _write(self, message: bytes) -> None:
        if not self._ready:
            private_folder(self.directory)
            self._ready = True
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-{next(self._counter):06d}-{secrets.token_hex(4)}.eml"
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(message)
            os.replace(temporary, self.directory / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
