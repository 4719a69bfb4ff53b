"""Settings: every DRIP_* variable, read once at an entry point into a frozen object passed down.

Nothing below the entry points reads os.environ. A malformed value is a ConfigError that names the
variable and says what a good value looks like.
"""

from __future__ import annotations

import math
import os
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from email.headerregistry import Address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from drip.addresses import one_mailbox
from drip.clock import Clock, parse_calendar_instant, read_clock_file, utcnow
from drip.durations import format_duration, parse_duration
from drip.errors import ConfigError
from drip.paths import TEMPLATES
from drip.patients import iana_zone_problem
from drip.permissions import private_folder
from drip.planning import SendWindow
from drip.urls import redact
from drip.wording import sensitive_words

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the checkout (tests and tools)
MIN_KEY_BYTES = 32
MAKE_KEY = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
Parser = Callable[[str, str], dict[str, Any]]


@dataclass(frozen=True, repr=False)
class Settings:
    """The whole configuration of one drip process (DESIGN §4)."""

    database_url: str = "sqlite:///var/drip.db"
    broker_url: str | None = None  # None: start a private Redis under var_dir
    mail_url: str = "file://var/outbox"
    mail_timeout: float = 0.0  # seconds per SMTP wait (DRIP_MAIL_URL ?timeout=); 0: files
    secret_key: str = field(default="", repr=False)  # signs unsubscribe links
    # verify them: secret_key first, then older keys
    secret_keys: tuple[str, ...] = field(default=(), repr=False)
    public_url: str = "http://127.0.0.1:8025"
    from_address: str = "Lakeside Wellness Clinic (demo) <care@clinic.example>"
    send_window: SendWindow = SendWindow.parse("09:00-19:00")
    now: datetime | None = None
    now_anchor: datetime | None = None  # the real instant at which the calendar read `now`
    now_file: Path | None = None
    lease_seconds: int = 300
    templates_dir: Path = TEMPLATES
    clinic_name: str = "Lakeside Wellness Clinic (demo)"
    clinic_address: str = "100 Example Street, Suite 200, Springfield, ST 00000 (demo address)"
    clinic_phone: str = "+1 555 0100 (demo number)"
    clinic_timezone: str = "America/New_York"
    clinic_route: str = "IV infusion"
    resources_url: str = "https://clinic.example/resources"
    tick_seconds: float = 5.0
    batch_size: int = 100
    min_gap: timedelta = timedelta(hours=12)
    retry_for: timedelta = timedelta(days=3)
    rate_limit: float | None = None  # messages per second across every worker; None: no limit
    daily_limit: int | None = None  # messages in any 24 hours across every worker; None: none
    var_dir: Path = Path("var")
    secret_key_generated: bool = False  # no DRIP_SECRET_KEY: the key generated into var/
    log_format: str = "text"  # DRIP_LOG_FORMAT: text, or json (one object a line)

    def __post_init__(self) -> None:
        """Keep secret_key first among secret_keys, however the settings were made."""
        if self.secret_key and self.secret_keys[:1] != (self.secret_key,):
            rest = tuple(k for k in self.secret_keys if k != self.secret_key)
            object.__setattr__(self, "secret_keys", (self.secret_key, *rest))

    def __repr__(self) -> str:
        """No secret, and every URL without its password: a repr ends up in logs and tracebacks."""
        shown = []
        for f in fields(self):
            if f.repr:
                value = getattr(self, f.name)
                if f.name.endswith("_url") and isinstance(value, str):
                    value = redact(value)
                shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every DRIP_* variable; raise ConfigError naming the first bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, parse in _PARSERS.items():
            raw = env.get(name, "")
            if raw.strip():
                values.update(parse(name, raw if name in _UNTRIMMED else raw.strip()))
        settings = replace(cls(), **values)
        settings.check_lease()
        settings.check_rate()
        if not settings.secret_key:
            settings = replace(
                settings, secret_key=stored_secret(settings.var_dir), secret_key_generated=True
            )
        return settings

    @property
    def slowest_send_seconds(self) -> float:
        """The longest one send may take before the transport's timeout ends it: a pipelined
        SMTP send waits twice (the envelope's replies, then the reply to the body), each wait
        bounded by DRIP_MAIL_URL's `timeout`; a second more for the rest."""
        return 2 * self.mail_timeout + 1

    @property
    def soft_deadline_seconds(self) -> float:
        """When a batch stops taking new emails (seconds after it started): a send begun just
        before it still ends before the lease and the hard time limit do."""
        return self.lease_seconds - self.slowest_send_seconds

    def check_lease(self) -> None:
        """A row marked `sending` holds its lease for as long as its send may take; a lease too
        short for that would turn slow sends `unknown`."""
        if self.lease_seconds < 2 * self.slowest_send_seconds:
            raise ConfigError(
                f"DRIP_LEASE_SECONDS={self.lease_seconds} is too short for DRIP_MAIL_URL's "
                f"timeout of {self.mail_timeout:g} s: one send may take "
                f"{self.slowest_send_seconds:g} s; set DRIP_LEASE_SECONDS to at least "
                f"{2 * self.slowest_send_seconds:.0f}, or "
                "a lower ?timeout= on DRIP_MAIL_URL"
            )

    def check_rate(self) -> None:
        """A batch must be able to send at least one email at DRIP_RATE_LIMIT before its soft
        deadline, or every batch would give its rows back without sending any."""
        if self.rate_limit is not None and 1 / self.rate_limit >= self.soft_deadline_seconds:
            raise ConfigError(
                f"DRIP_RATE_LIMIT={self.rate_limit:g} allows one email every "
                f"{1 / self.rate_limit:g} s, longer than a batch may run "
                f"({self.soft_deadline_seconds:g} s with DRIP_LEASE_SECONDS="
                f"{self.lease_seconds}); raise DRIP_RATE_LIMIT or DRIP_LEASE_SECONDS"
            )

    def clock(self) -> Clock:
        """The process's clock; every one made from these settings reads the same calendar."""
        return Clock(self.now, self.now_file, self.now_anchor)

    @property
    def uses_real_clock(self) -> bool:
        """False under DRIP_NOW or DRIP_NOW_FILE: the calendar is then not the database's."""
        return self.now is None and self.now_file is None

    @property
    def lease(self) -> timedelta:
        """How long a claim (and a row in `sending`) is held before the ticker takes it back."""
        return timedelta(seconds=self.lease_seconds)

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url is None


def stored_secret(var_dir: Path) -> str:
    """The key generated once into var/ when DRIP_SECRET_KEY is not set.

    Processes starting at once must agree on it, and none may read a half-written file: the key
    is written whole (mode 0600) under a temporary name, then hard-linked into place, which
    fails if another process got there first; everyone then reads the one that won."""
    path = var_dir / "secret_key"
    if not path.exists():
        private_folder(var_dir)
        fd, temporary = tempfile.mkstemp(dir=var_dir, prefix=".secret_key.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(temporary)
    key = path.read_text().strip()
    if not key:
        raise ConfigError(
            f"{path} is empty: put back the key from a backup (links in emails already sent "
            "were signed with it), or delete the file to have a new one generated, or set "
            "DRIP_SECRET_KEY"
        )
    return key


def _url(field: str, schemes: tuple[str, ...], example: str) -> Parser:
    def parse(name: str, raw: str) -> dict[str, Any]:
        scheme = raw.split(":", 1)[0].lower() if ":" in raw else ""
        base = scheme.split("+", 1)[0]
        if base not in schemes:
            raise ConfigError(
                f"{name}={redact(raw)!r} is not a {'/'.join(schemes)} URL; set it like {example}"
            )
        if base != "file" and not raw[len(scheme) :].startswith("://"):
            raise ConfigError(
                f"{name}={redact(raw)!r} needs // after {scheme}:; set it like {example}"
            )
        if "@" in raw.rpartition("@")[0][len(scheme) + 3 :].split("/", 1)[0]:
            raise ConfigError(
                f"{name}={redact(raw)!r} has an '@' in its user name or password; write it as "
                "%40 (and ':' as %3A, '/' as %2F)"
            )
        parts = urlsplit(raw)
        needs_host = ("smtp", "smtps", "redis", "rediss", "http", "https")
        if scheme in needs_host and not parts.hostname:
            raise ConfigError(f"{name} has no host; set it like {example}")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ConfigError(f"{name} has a bad port; set it like {example}") from None
        if field == "public_url":
            # It goes into every email's List-Unsubscribe header and links, which take ASCII only.
            if not raw.isascii() or any(c.isspace() for c in raw):
                raise ConfigError(
                    f"{name} must be ASCII without spaces (an international domain in its xn-- "
                    f"form, other characters %-encoded); set it like {example}"
                )
            # Links are this URL + /unsubscribe/<token>: after a ? or # the token never reaches
            # drip serve, and <, > or " would end the List-Unsubscribe header's <…> early.
            if parts.query or parts.fragment or any(c in raw for c in '?#<>"\\'):
                raise ConfigError(
                    f"{name} must be the base address of drip serve, with no ? or # and none of "
                    f'< > " \\ (links add /unsubscribe/… to it); set it like {example}'
                )
            return {field: raw.rstrip("/")}
        return {field: raw}

    return parse


def _mail_url(name: str, raw: str) -> dict[str, Any]:
    """The URL's form, then every option, checked by the parser that will use it (nothing
    connects until the first send), so a bad `?tls=` fails at start-up, not in the worker."""
    from drip.transports import open_transport

    value = _url("mail_url", ("smtp", "smtps", "file"), "smtp://user:pass@mail.example:587")(
        name, raw
    )
    transport = open_transport(raw)
    transport.close()
    return value | {"mail_timeout": float(getattr(transport, "timeout", 0.0))}


def _int(field: str, low: int, high: int) -> Parser:
    def parse(name: str, raw: str) -> dict[str, Any]:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a whole number") from None
        if not low <= value <= high:
            raise ConfigError(f"{name}={value} is out of range; use {low} to {high}")
        return {field: value}

    return parse


def _seconds(name: str, raw: str) -> dict[str, Any]:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds, e.g. 5") from None
    if not 0.1 <= value <= 3600:
        raise ConfigError(f"{name}={value} is out of range; use 0.1 to 3600 seconds")
    return {"tick_seconds": value}


MAX_RATE = 100_000.0  # messages per second: far beyond any relay's limit


def _rate(name: str, raw: str) -> dict[str, Any]:
    """Messages per second: a positive, finite number (`14`, `0.5`)."""
    example = "e.g. 14 (a new Amazon SES account) or 0.5 (one every 2 s)"
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not a number of messages per second; set it like {example}"
        ) from None
    if not math.isfinite(value) or not 0 < value <= MAX_RATE:
        raise ConfigError(
            f"{name}={raw!r} is out of range: messages per second must be more than 0 and at "
            f"most {MAX_RATE:,.0f}; set it like {example}, or leave it unset for no limit"
        )
    return {"rate_limit": value}


def _duration(field: str, low: timedelta, high: timedelta) -> Parser:
    def parse(name: str, raw: str) -> dict[str, Any]:
        try:
            value = timedelta(0) if raw == "0" else parse_duration(raw)
        except ValueError:
            raise ConfigError(
                f"{name}={raw!r} is not a duration; set it like 12h, 3d or 1d12h"
            ) from None
        if not low <= value <= high:
            raise ConfigError(
                f"{name}={raw} is out of range; use {format_duration(low)} to "
                f"{format_duration(high)}"
            )
        return {field: value}

    return parse


def _window(name: str, raw: str) -> dict[str, Any]:
    try:
        return {"send_window": SendWindow.parse(raw)}
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r}: {e}") from None


def _now(name: str, raw: str) -> dict[str, Any]:
    """The instant, and the real one at which the calendar reads it: now, as settings are read."""
    try:
        return {"now": parse_calendar_instant(raw), "now_anchor": utcnow()}
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} {e}; set it like 2026-11-01T09:00:00-05:00") from None


def _now_file(name: str, raw: str) -> dict[str, Any]:
    path = Path(raw)
    try:
        read_clock_file(path)
    except OSError:
        raise ConfigError(f"{name}={raw!r} must name a file holding an ISO-8601 instant") from None
    except ValueError as e:
        raise ConfigError(
            f"{name}={raw!r}: the instant in the file {e}; write one like 2026-11-01T09:00:00-05:00"
        ) from None
    return {"now_file": path}


LOG_FORMATS = ("text", "json")


def _log_format(name: str, raw: str) -> dict[str, Any]:
    if raw.lower() not in LOG_FORMATS:
        raise ConfigError(
            f"{name}={raw!r} is not a log format; set it to text (the default) or json "
            "(one JSON object a line)"
        )
    return {"log_format": raw.lower()}


def _zone(name: str, raw: str) -> dict[str, Any]:
    if problem := iana_zone_problem(raw):
        raise ConfigError(f"{name}={problem}")
    return {"clinic_timezone": raw}


def _from(name: str, raw: str) -> dict[str, Any]:
    """One mailbox with a display name (a comma in it is fine: it is quoted when sent). The
    name shows on lock screens, so it may not name a drug, condition or treatment. An
    international domain is kept in its xn-- form, which the relay and every header take."""
    example = 'e.g. "Lakeside Clinic <care@lakeside.example>"'
    raw = raw.strip(" ")
    try:
        display, addr = one_mailbox(raw)
    except ValueError as e:
        raise ConfigError(f"{name} {e}; set it to one mailbox on one line, {example}") from None
    try:
        Address(display_name=display, addr_spec=addr)
    except (ValueError, IndexError):
        display = ""
    if not display:
        raise ConfigError(f"{name}={raw!r} needs a display name and an address, {example}")
    found = sensitive_words(display)
    if found:
        raise ConfigError(
            f"{name}'s display name {display!r} contains {found[0]!r}, which lock screens and "
            f"shared inboxes would show; use the clinic's plain name, {example}"
        )
    return {"from_address": f"{raw[: raw.rindex('<')]}<{addr}>"}


# The drivers drip is written for (psycopg 3's COPY and prepare_threshold, the pysqlite dialect).
DATABASE_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql", "postgres", "postgresql+psycopg")


def _database_url(name: str, raw: str) -> dict[str, Any]:
    """sqlite, or PostgreSQL spelled postgres://, postgresql:// or postgresql+psycopg:// (the
    engine maps the first two to psycopg 3; SQLAlchemy knows no `postgres+driver`). Any other
    driver is refused here, not by SQLAlchemy's NoSuchModuleError when the engine is made."""
    if raw.lower().startswith("postgres+"):
        raise ConfigError(f"{name} names a driver after postgres+; write postgresql+psycopg://…")
    example = "sqlite:///var/drip.db or postgresql://…"
    scheme = raw.split(":", 1)[0].lower()
    if "+" in scheme and scheme not in DATABASE_DRIVERS:
        raise ConfigError(
            f"{name} names the driver {scheme.split('+', 1)[1]!r}, which drip does not use; "
            f"drip supports {', '.join(DATABASE_DRIVERS)} (postgresql:// means psycopg 3), "
            f"e.g. {example}"
        )
    return _url("database_url", ("sqlite", "postgresql", "postgres"), example)(name, raw)


def _secret_keys(name: str, raw: str) -> dict[str, Any]:
    """One key, or several comma-separated (the first signs, all verify), each 32+ bytes."""
    _text("secret_key")(name, raw)
    keys = tuple(key.strip() for key in raw.split(","))
    for position, key in enumerate(keys, 1):
        if len(key.encode()) < MIN_KEY_BYTES:
            which = f"key {position} of {len(keys)}" if len(keys) > 1 else "the key"
            raise ConfigError(
                f"{name}: {which} has {len(key.encode())} bytes; each key needs at least "
                f"{MIN_KEY_BYTES} bytes (several keys are comma-separated, the first signs). "
                f"Make one with: {MAKE_KEY}"
            )
    return {"secret_key": keys[0], "secret_keys": keys}


def _text(field: str) -> Parser:
    def parse(name: str, raw: str) -> dict[str, Any]:
        if any(ord(c) < 32 for c in raw):
            raise ConfigError(f"{name} contains a control character (a newline?); use one line")
        return {field: raw}

    return parse


def _path(field: str) -> Parser:
    def parse(name: str, raw: str) -> dict[str, Any]:
        return {field: Path(raw)}

    return parse


# Read as they are, not trimmed: a line break at the end of DRIP_FROM is refused, not dropped,
# as it would be refused anywhere else in a value that goes into a header.
_UNTRIMMED = {"DRIP_FROM"}

_PARSERS = {
    "DRIP_DATABASE_URL": _database_url,
    "DRIP_BROKER_URL": _url("broker_url", ("redis", "rediss"), "redis://127.0.0.1:6379/0"),
    "DRIP_MAIL_URL": _mail_url,
    "DRIP_SECRET_KEY": _secret_keys,
    "DRIP_PUBLIC_URL": _url("public_url", ("http", "https"), "https://drip.clinic.example"),
    "DRIP_FROM": _from,
    "DRIP_SEND_WINDOW": _window,
    "DRIP_NOW": _now,
    "DRIP_NOW_FILE": _now_file,
    "DRIP_LEASE_SECONDS": _int("lease_seconds", 10, 86400),
    "DRIP_TEMPLATES_DIR": _path("templates_dir"),
    "DRIP_CLINIC_NAME": _text("clinic_name"),
    "DRIP_CLINIC_ADDRESS": _text("clinic_address"),
    "DRIP_CLINIC_PHONE": _text("clinic_phone"),
    "DRIP_CLINIC_TIMEZONE": _zone,
    "DRIP_CLINIC_ROUTE": _text("clinic_route"),
    "DRIP_RESOURCES_URL": _url("resources_url", ("http", "https"), "https://clinic.example/guides"),
    "DRIP_TICK_SECONDS": _seconds,
    "DRIP_BATCH_SIZE": _int("batch_size", 1, 10000),
    "DRIP_MIN_GAP": _duration("min_gap", timedelta(0), timedelta(days=7)),
    "DRIP_RETRY_FOR": _duration("retry_for", timedelta(minutes=1), timedelta(days=30)),
    "DRIP_LOG_FORMAT": _log_format,
    "DRIP_RATE_LIMIT": _rate,
    "DRIP_DAILY_LIMIT": _int("daily_limit", 1, 100_000_000),
}
