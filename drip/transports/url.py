"""DRIP_MAIL_URL: which transport it names, with which options, checked before anything connects."""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from drip.errors import ConfigError
from drip.transports.base import Transport
from drip.transports.file import FileTransport
from drip.transports.smtp import DEFAULT_TIMEOUT, SMTPTransport, TlsMode


def open_transport(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> Transport:
    """The transport DRIP_MAIL_URL names; nothing is connected until the first send.

    smtp://[user:pass@]host[:25][?tls=required][&timeout=30]   STARTTLS whenever offered
    smtp://host[:25]?tls=none                                  never TLS (a relay on this host)
    smtps://[user:pass@]host[:465][?timeout=30]                implicit TLS
    &cafile=/path/ca.pem                                       verify against a private CA
    file:///abs/dir  or  file://relative/dir                   one .eml file per message
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme == "file":
        _options(parts, allowed=())
        return FileTransport(_file_directory(parts))
    if scheme in ("smtp", "smtps"):
        return _smtp_from_url(parts, scheme, timeout)
    raise ConfigError(
        f"DRIP_MAIL_URL must start with smtp://, smtps:// or file:// (it starts with "
        f"{scheme + '://' if scheme else 'no scheme'}); set it like smtp://user:pass@mail.example:587"
    )


def mail_timeout(url: str) -> float | None:
    """The seconds DRIP_MAIL_URL lets the SMTP transport wait on any one step of a send (its
    ?timeout=, else the default); None for file://, which waits on no server. A send waits
    several times (SMTPTransport says how many), so a caller bounding the slowest send, such as
    a lease that must outlast a batch, multiplies it."""
    transport = open_transport(url)
    return transport.timeout if isinstance(transport, SMTPTransport) else None


def _smtp_from_url(parts: SplitResult, scheme: str, timeout: float) -> SMTPTransport:
    options = _options(parts, allowed=("tls", "timeout", "cafile"))
    tls = _tls_mode(scheme, options.get("tls"))
    if not parts.hostname:
        raise ConfigError(
            "DRIP_MAIL_URL has no host; set it like smtp://user:pass@mail.example:587"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(
            "DRIP_MAIL_URL has a bad port; set it like smtp://mail.example:587"
        ) from None
    context = None
    if "cafile" in options:
        if tls == "none":
            raise ConfigError(
                "DRIP_MAIL_URL has cafile= and tls=none, which never uses TLS; drop one of them"
            )
        context = _private_ca(options["cafile"])
    return SMTPTransport(
        parts.hostname,
        port or (465 if scheme == "smtps" else 25),
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password or ""),
        tls=tls,
        timeout=_timeout(options["timeout"]) if "timeout" in options else timeout,
        ssl_context=context,
    )


def _tls_mode(scheme: str, option: str | None) -> TlsMode:
    """smtps:// is TLS from the first byte; smtp:// uses STARTTLS when offered, insists on it
    with tls=required, and never uses it with tls=none (the one way to let a password go
    unencrypted, for a relay on this host or a network one trusts)."""
    if scheme == "smtps":
        if option not in (None, "required"):
            raise ConfigError(
                f"DRIP_MAIL_URL is smtps:// (TLS from the first byte) with tls={option!r}; "
                "leave tls= out, or use smtp:// for a relay without TLS"
            )
        return "implicit"
    modes: dict[str | None, TlsMode] = {
        None: "opportunistic",
        "opportunistic": "opportunistic",
        "required": "required",
        "none": "none",
    }
    if option not in modes:
        raise ConfigError(
            f"DRIP_MAIL_URL has tls={option!r}; use tls=required (STARTTLS or nothing), "
            "tls=none (no TLS: only for a relay on this host), or leave it out"
        )
    return modes[option]


def _private_ca(raw: str) -> ssl.SSLContext:
    """The context that verifies the relay against the CA certificate(s) in `cafile` instead
    of the system's store (hostname checked as always), loaded now so a wrong path fails at
    start-up, not at the first send."""
    path = Path(raw).expanduser()
    fix = "set ?cafile= to a PEM file holding the CA certificate that signed the relay's own"
    if not path.is_file():
        raise ConfigError(f"DRIP_MAIL_URL has cafile={raw!r}, which is not a file; {fix}")
    try:
        return ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError, ValueError) as e:
        why = getattr(e, "strerror", None) or getattr(e, "reason", None) or type(e).__name__
        raise ConfigError(
            f"DRIP_MAIL_URL has cafile={raw!r}, which holds no certificate ssl can load "
            f"({why}); {fix}"
        ) from None


def _options(parts: SplitResult, *, allowed: tuple[str, ...]) -> dict[str, str]:
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none"
        raise ConfigError(f"DRIP_MAIL_URL has unknown option(s) {unknown}; known: {known}")
    return options


def _timeout(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise ConfigError(f"DRIP_MAIL_URL has timeout={raw!r}; use seconds between 0 and 3600")
    return value


def _file_directory(parts: SplitResult) -> Path:
    """file:///abs/dir is absolute; file://var/outbox (DESIGN's default) is var/outbox, relative."""
    path = unquote(parts.netloc + parts.path)
    if not path:
        raise ConfigError("DRIP_MAIL_URL names no folder; set it like file://var/outbox")
    return Path(path)
