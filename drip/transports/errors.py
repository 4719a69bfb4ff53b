"""What a failed send means for the caller's retry policy: every SMTP reply and every network or
disk error a transport meets becomes one of drip's DeliveryError classes here, and only here.

    TransientDeliveryError   nothing was accepted: retry later, with back-off. A 4xx reply, a
                             refused, dropped or timed-out connection before the body went out,
                             421 at the greeting, and every problem in setting up the session
                             (TLS, authentication, a server that requires authentication) so
                             that a configuration mistake delays mail instead of losing it; an
                             outbox folder that cannot be written.
    PermanentDeliveryError   the server refused this message with a 5xx reply to MAIL, RCPT or
                             after the body: never retry. `.bad_mailbox` (5.1.x) means the
                             address itself is bad and should be suppressed.
    UnknownOutcomeError      lost after the body started going out and before the final reply:
                             the message may have been delivered. Do not resend automatically.

Error messages carry the SMTP code, the enhanced status (RFC 3463) and the server's text with
anything that looks like an address replaced by "[address]"; never the recipient or the message.
The exception classes themselves live in drip.errors, with the rest of drip's errors.
"""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

from drip.errors import (
    DeliveryError,
    PermanentDeliveryError,
    TransientDeliveryError,
    UnknownOutcomeError,
)

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")
_ADDRESS = re.compile(r"[^\s<>\"'()\[\],;:]+@[^\s<>\"'()\[\],;:]+")


def refusal(where: str, stage: str, code: int, text: bytes) -> DeliveryError:
    """The error for a refusal: 5xx is permanent, except 530 (authentication required), which
    is a configuration problem that must not fail every message."""
    reply = _reply(code, text)
    if code == 530:
        return TransientDeliveryError(
            f"{where} requires authentication at {stage}: {reply}; put user:pass in DRIP_MAIL_URL"
        )
    if 500 <= code < 600:
        enhanced = _enhanced(text)
        return PermanentDeliveryError(
            f"{where} refused {stage}: {reply}", code=code, enhanced=enhanced
        )
    return TransientDeliveryError(f"{where} deferred {stage}: {reply}")


def lost_before_content(where: str, stage: str, error: OSError) -> TransientDeliveryError:
    """The connection failed at `stage`, before any content went out: nothing of the message was
    accepted, so a retry cannot send it twice."""
    return TransientDeliveryError(f"{where}: connection lost at {stage}: {describe(error)}")


def lost_after_content(where: str, error: OSError) -> UnknownOutcomeError:
    """The connection failed once the body was going out: the server may have queued it."""
    return UnknownOutcomeError(
        f"{where}: connection lost after the message body was sent and before "
        f"the server's reply ({describe(error)}); the message may have been delivered"
    )


def unexpected_after_content(where: str, code: int, text: bytes) -> UnknownOutcomeError:
    """A reply after the body that is neither success nor refusal: the server is out of step."""
    return UnknownOutcomeError(
        f"{where}: unexpected reply after the message body: "
        f"{_reply(code, text)}; the message may have been delivered"
    )


def setup_failed(where: str, error: Exception) -> TransientDeliveryError:
    """Any failure to set up a session is about the server or the settings, never about one
    message, so it is transient."""
    return TransientDeliveryError(f"cannot open a session with {where}: {describe(error)}")


def login_refused(where: str, error: smtplib.SMTPAuthenticationError) -> TransientDeliveryError:
    """Wrong credentials are a configuration mistake: the mail waits for the fix."""
    return TransientDeliveryError(
        f"{where} refused the user and password in DRIP_MAIL_URL: {describe(error)}"
    )


def outbox_failed(directory: Path, error: OSError) -> TransientDeliveryError:
    """A folder that cannot be written (full disk, permissions) may be fixed: retry later."""
    return TransientDeliveryError(
        f"cannot write to the outbox {directory}: {error.strerror or error}"
    )


def describe(e: Exception) -> str:
    """An exception fit for logs: a server reply it carries, or its text, without addresses."""
    if isinstance(e, smtplib.SMTPResponseException):
        raw = e.smtp_error if isinstance(e.smtp_error, bytes) else str(e.smtp_error).encode()
        return _reply(e.smtp_code, raw)
    return _ADDRESS.sub("[address]", str(e) or type(e).__name__)


def _enhanced(text: bytes) -> str:
    match = _ENHANCED.match(text.decode("ascii", "replace"))
    return match.group(1) if match else ""


def _reply(code: int, text: bytes) -> str:
    """A server reply fit for logs: addresses it quotes are replaced, length is bounded."""
    clean = _ADDRESS.sub("[address]", text.decode("utf-8", "replace").replace("\n", " "))
    return f"{code} {clean[:300]}".rstrip()
