"""What a failed send means for the caller's retry policy: every SMTP reply and every network or
disk error a transport meets becomes one of drip's DeliveryError classes here, and only here.

    TransientDeliveryError   nothing was accepted: retry later, with back-off. A 4xx reply, a
                             refused, dropped or timed-out connection before the body went out,
                             421 at the greeting, a session that could not be set up for a
                             network reason; an outbox folder that cannot be written.
      RelayConfigError       the relay cannot be used as DRIP_MAIL_URL says, whichever message
                             is sent: a TLS certificate that does not verify or a failed TLS
                             handshake, no STARTTLS under tls=required, a password that would go
                             unencrypted, credentials refused or needed (530), no AUTH offered.
                             Nothing was sent. An operator must fix it; a sender holds every
                             message meanwhile (drip.sending gives the batch back and opens the
                             circuit breaker), so it costs no patient's row a try or a failure.
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
import ssl
from pathlib import Path

from drip.errors import (
    DeliveryError,
    PermanentDeliveryError,
    RelayConfigError,
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
        return RelayConfigError(
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
    """A session that could not be set up for a network reason (refused, dropped, timed out,
    a greeting other than 220) is about the server, never about one message: transient. A TLS
    failure that is no dropped connection is the relay's or the settings': tls_failed."""
    if isinstance(error, ssl.SSLError) and not isinstance(
        error, ssl.SSLEOFError | ssl.SSLZeroReturnError
    ):
        return tls_failed(where, error)
    return TransientDeliveryError(f"cannot open a session with {where}: {describe(error)}")


def tls_failed(where: str, error: ssl.SSLError) -> RelayConfigError:
    """The relay's certificate does not verify against the system's store (or ?cafile=), or
    the two ends speak no TLS in common: every message would meet it, until someone fixes it."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return RelayConfigError(
            f"the TLS certificate of {where} does not verify ({describe(error)}); nothing was "
            "sent. Fix the relay's certificate (it must be valid for the host in DRIP_MAIL_URL), "
            "or, if a private CA signed it, add ?cafile=/path/to/ca.pem to DRIP_MAIL_URL"
        )
    return RelayConfigError(
        f"the TLS handshake with {where} failed ({describe(error)}); nothing was sent. Check "
        "that the port speaks TLS as DRIP_MAIL_URL says: smtps:// for TLS from the first byte "
        "(usually port 465), smtp:// for STARTTLS (usually 587)"
    )


def no_starttls(where: str) -> RelayConfigError:
    """tls=required, and the relay does not offer STARTTLS: nothing goes out in plain text."""
    return RelayConfigError(
        f"{where} does not offer STARTTLS and DRIP_MAIL_URL has tls=required; nothing was sent. "
        "Use a port that offers STARTTLS (usually 587), or smtps:// for TLS from the first byte"
    )


def password_unencrypted(where: str) -> RelayConfigError:
    """Credentials in DRIP_MAIL_URL and no TLS: the password is never sent in plain text."""
    return RelayConfigError(
        f"refusing to send the DRIP_MAIL_URL password to {where} unencrypted: it does not offer "
        "STARTTLS; nothing was sent. Use smtps:// (TLS from the first byte, usually port 465) "
        "or a port that offers STARTTLS (usually 587); only for a relay on this host or a "
        "network you trust, add ?tls=none to send the password in plain text"
    )


def no_auth(where: str) -> RelayConfigError:
    """Credentials in DRIP_MAIL_URL, and a relay that offers no AUTH to take them."""
    return RelayConfigError(
        f"{where} offers no AUTH, and DRIP_MAIL_URL has a user and password; nothing was sent. "
        "Remove user:pass from DRIP_MAIL_URL, or use the relay's submission port (usually 587)"
    )


def login_refused(where: str, error: smtplib.SMTPAuthenticationError) -> RelayConfigError:
    """Wrong credentials are a configuration mistake: the mail waits for the fix."""
    return RelayConfigError(
        f"{where} refused the user and password in DRIP_MAIL_URL: {describe(error)}"
    )


def bad_envelope(which: str, why: str) -> PermanentDeliveryError:
    """An envelope address that is not one address: this message can never go, and nothing
    of it was written. No enhanced code: it says nothing of the mailbox."""
    return PermanentDeliveryError(f"the {which} {why}; nothing was sent")


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
