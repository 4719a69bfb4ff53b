"""The interface every transport implements, and what they share."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Protocol, Self


class Transport(Protocol):
    """Delivers finished messages; usable as a context manager that closes it."""

    def send(
        self,
        envelope_from: str,
        recipient: str,
        message: bytes,
        *,
        before_content: Callable[[], None] | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> None:
        """Deliver one message (bytes with CRLF line endings, headers included).

        `before_content`, if given, is called at most once, before any of the message's content
        goes out: the caller's last word on whether it may. If it raises, nothing of the message
        is delivered, the exception propagates, and a connection the server may still expect
        content on is dropped. It is not called when the send fails before that point.

        `while_waiting`, if given, may be called once while the server is busy with the message
        (after the body went out, before its reply is read): work to overlap with that wait. It
        must not raise.

        Raises TransientDeliveryError, PermanentDeliveryError or UnknownOutcomeError (see
        drip.transports.errors for what each means to the caller)."""

    def close(self) -> None:
        """Release the connection, if any. Sending again later reopens it."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class _Closing:
    """Context-manager support shared by the transports."""

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
