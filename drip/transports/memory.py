"""Messages kept in a list, with scripted failures: the fake that unit tests of callers use."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from drip.transports.base import _Closing


@dataclass(frozen=True)
class AfterContent:
    """A scripted failure raised after `before_content` returned, as a real server fails once
    the caller has marked the row `sending`: a connection lost before the final reply
    (UnknownOutcomeError), or a refusal of the body (PermanentDeliveryError)."""

    error: Exception


Failure = Exception | AfterContent | None


class MemoryTransport(_Closing):
    """Keeps messages in `messages` as (envelope_from, recipient, message) tuples.

    `failures` scripts successive sends: an exception is raised before `before_content` is called,
    `AfterContent(exception)` raises it after, None means succeed; a failed send records nothing.
    Once the list is used up every send succeeds.
    """

    def __init__(self, failures: Iterable[Failure] | None = None) -> None:
        self.messages: list[tuple[str, str, bytes]] = []
        self.failures: list[Failure] = list(failures or [])
        self.attempts = 0
        self.closed = False

    def send(
        self,
        envelope_from: str,
        recipient: str,
        message: bytes,
        *,
        before_content: Callable[[], None] | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> None:
        self.attempts += 1
        failure = self.failures.pop(0) if self.failures else None
        if isinstance(failure, Exception):
            raise failure
        if before_content is not None:
            before_content()
        if isinstance(failure, AfterContent):
            raise failure.error
        self.messages.append((envelope_from, recipient, message))
        self.closed = False

    def close(self) -> None:
        self.closed = True
