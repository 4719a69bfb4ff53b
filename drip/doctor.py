"""`drip doctor`: checks of an installation, each a line saying what is wrong and how to fix it.

Each check is a small function registered with `@check(name, needs=…)` (the shape of Django's
checks registry): it gets a Context and yields the Problems it finds, each with an id such as
`smtp.starttls-missing`, what is wrong and the fix. One loop runs them in order; a check whose
`needs` failed is skipped (no ticker check without a broker), so one broken thing is one line.

An `error` is a problem: drip will not work as it should (exit 1). A `warning` is worth a look
but nothing is broken (exit 0): a short send window, an http link on a demo set-up.

The JSON shape (`drip doctor --json`) is a list, one object per finding or per check passed:
`{"id", "check", "ok", "severity", "problem", "fix"}`, where `severity` is "ok", "warning",
"error" or "skipped", `ok` is true only for "ok", and `problem`/`fix` are null when ok.
"""

from __future__ import annotations

import os
import smtplib
import sqlite3
import ssl
import zoneinfo
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from drip import db
from drip.errors import DripError
from drip.models import PATIENTS, SUPPRESSIONS
from drip.permissions import FILE_MODE, FOLDER_MODE, loose
from drip.settings import MAKE_KEY, Settings
from drip.transports import open_transport
from drip.transports.errors import describe
from drip.transports.file import FileTransport
from drip.transports.smtp import SMTPTransport

ERROR, WARNING, OK, SKIPPED = "error", "warning", "ok", "skipped"
SMTP_TIMEOUT = 5.0  # seconds any one SMTP wait may take here (a send's may be longer)
MAX_LINT_FINDINGS = 20  # shown one by one; `drip campaigns validate` lists them all


@dataclass(frozen=True)
class Problem:
    """One thing wrong: an id (`check.what`), what it is, the fix, and how bad."""

    id: str
    problem: str
    fix: str
    severity: str = ERROR


@dataclass(frozen=True)
class Result:
    """One line of the report: a problem a check found, or a check that passed or was skipped."""

    check: str
    severity: str
    id: str
    problem: str | None = None
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.severity == OK

    def __str__(self) -> str:
        if self.severity == OK:
            return f"{self.id}: {self.problem or 'ok'}"
        return f"{self.id}: {self.problem}" + (f" — fix: {self.fix}" if self.fix else "")

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "check": self.check,
            "ok": self.ok,
            "severity": self.severity,
            "problem": None if self.ok else self.problem,
            "fix": self.fix,
        }


@dataclass
class Context:
    """What the checks look at, each made once, on first use."""

    settings: Settings
    now: datetime
    ssl_context: ssl.SSLContext | None = None  # None: the system's CAs (or ?cafile=)
    notes: dict[str, str] = field(default_factory=dict)  # check → what a passing check saw

    @cached_property
    def engine(self) -> Engine:
        return db.probe_engine(self.settings.database_url)

    @cached_property
    def redis(self) -> Any:
        from drip.status import redis_view

        return redis_view(self.settings)

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()


CheckFunction = Callable[[Context], Iterable[Problem]]


@dataclass(frozen=True)
class Check:
    name: str
    run: CheckFunction
    needs: tuple[str, ...]


REGISTRY: list[Check] = []


def check(name: str, *, needs: tuple[str, ...] = ()) -> Callable[[CheckFunction], CheckFunction]:
    """Register a check: it runs after those it `needs`, and is skipped if one of them failed."""

    def register(function: CheckFunction) -> CheckFunction:
        REGISTRY.append(Check(name, function, needs))
        return function

    return register


def run(context: Context, checks: Iterable[Check] | None = None) -> list[Result]:
    """Every check in order, one Result per problem found (or one for a check that passed)."""
    results: list[Result] = []
    failed: set[str] = set()
    for each in REGISTRY if checks is None else checks:
        blocked = next((n for n in each.needs if n in failed), None)
        if blocked is not None:
            failed.add(each.name)
            results.append(Result(each.name, SKIPPED, each.name, f"not checked: {blocked} failed"))
            continue
        problems = list(each.run(context))
        if any(p.severity == ERROR for p in problems):
            failed.add(each.name)
        results += [Result(each.name, p.severity, p.id, p.problem, p.fix) for p in problems]
        if not problems:
            results.append(Result(each.name, OK, each.name, context.notes.get(each.name)))
    return results


def summary(results: list[Result]) -> str:
    errors = sum(r.severity == ERROR for r in results)
    warnings = sum(r.severity == WARNING for r in results)
    if not errors and not warnings:
        return f"all {len({r.check for r in results})} checks passed"
    said = f"{errors} problem{'s' if errors != 1 else ''}"
    return said + (f", {warnings} warning{'s' if warnings != 1 else ''}" if warnings else "")


# --- the database ---------------------------------------------------------------------------

DATABASE_FIX = "start the database server, or correct DRIP_DATABASE_URL"


@check("database")
def database_reachable(ctx: Context) -> Iterator[Problem]:
    try:
        with ctx.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except (DBAPIError, sqlite3.DatabaseError) as e:
        reason = e.orig if isinstance(e, DBAPIError) else e
        first = str(reason).strip().splitlines()[0] if str(reason).strip() else type(e).__name__
        where = db.shown_url(ctx.engine)
        yield Problem("database.unreachable", f"cannot reach {where}: {first}", DATABASE_FIX)
        return
    ctx.notes["database"] = f"{db.shown_url(ctx.engine)} answers"


@check("migrations", needs=("database",))
def migrated_to_head(ctx: Context) -> Iterator[Problem]:
    current, head = db.schema_revision(ctx.engine)
    if current is None:
        yield Problem("migrations.none", "the database has no drip tables", "run `drip db upgrade`")
    elif current != head and _known_revision(current):
        yield Problem(
            "migrations.behind",
            f"the database schema is at revision {current}, this drip needs {head}",
            "run `drip db upgrade` (back the database up first)",
        )
    elif current != head:
        yield Problem(
            "migrations.ahead",
            f"the database is at revision {current}, which this drip does not know: a newer "
            "drip migrated it",
            "install that newer drip on this host too",
        )
    else:
        ctx.notes["migrations"] = f"at revision {current}, the newest"


def _known_revision(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(db.alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


@check("clock", needs=("database",))
def clock_in_step(ctx: Context) -> Iterator[Problem]:
    if not ctx.settings.uses_real_clock:
        ctx.notes["clock"] = "not compared: DRIP_NOW or DRIP_NOW_FILE sets this calendar"
        return
    offset = db.clock_offset(ctx.engine)
    if abs(offset) > db.MAX_CLOCK_SKEW:
        direction = "behind" if offset > timedelta(0) else "ahead of"
        yield Problem(
            "clock.skew",
            f"this host's clock is {abs(offset).total_seconds():.1f} s {direction} the "
            f"database's (drip's workers refuse to run beyond "
            f"{db.MAX_CLOCK_SKEW.total_seconds():g} s: leases must hold across hosts)",
            "sync this host's clock (chrony/ntpd)",
        )
        return
    ctx.notes["clock"] = f"{offset.total_seconds():+.3f} s from the database's"


@check("zones", needs=("migrations",))
def patient_zones_known(ctx: Context) -> Iterator[Problem]:
    """Every patient's zone must load here, or their emails cannot be planned on this host."""
    with ctx.engine.connect() as connection:
        zones = connection.execute(
            select(PATIENTS.c.timezone, func.count()).group_by(PATIENTS.c.timezone)
        ).all()
    for name, patients in zones:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            yield Problem(
                "zones.unknown",
                f"the time zone {name!r} of {patients} patient(s) is unknown to this host's "
                "time-zone data",
                "update tzdata on this host (pip install -U tzdata), or correct those patients'"
                " zones",
            )
    ctx.notes["zones"] = f"{len(zones)} zone(s) in use, all known"


@check("suppressions", needs=("migrations",))
def suppressions_matched(ctx: Context) -> Iterator[Problem]:
    """Entries of the suppression list made under a key no longer in DRIP_SECRET_KEY match no
    address any more: the people behind them could be enrolled and emailed again."""
    from drip.suppression import key_id

    known = {key_id(key) for key in ctx.settings.secret_keys}
    with ctx.engine.connect() as connection:
        by_key = connection.execute(
            select(SUPPRESSIONS.c.key_id, func.count()).group_by(SUPPRESSIONS.c.key_id)
        ).all()
    lost = sum(count for key, count in by_key if key not in known)
    if lost:
        yield Problem(
            "suppressions.key-missing",
            f"{lost} suppression entr{'y' if lost == 1 else 'ies'} were made under a key that "
            "is no longer in DRIP_SECRET_KEY, so they match no address: those people could be "
            "enrolled and emailed again",
            "put the old key back at the end of DRIP_SECRET_KEY (the first key signs, every "
            "key verifies and matches)",
        )
    ctx.notes["suppressions"] = f"{sum(c for _, c in by_key)} entr(ies), all under known keys"


# --- Redis and the processes behind it --------------------------------------------------------


@check("broker")
def broker_reachable(ctx: Context) -> Iterator[Problem]:
    view = ctx.redis
    if not view.reachable:
        code = "broker.not-running" if view.error == "not running" else "broker.unreachable"
        yield Problem(code, view.problem, view.fix)
        return
    ctx.notes["broker"] = f"{view.shown} answers"


@check("workers", needs=("broker",))
def workers_alive(ctx: Context) -> Iterator[Problem]:
    workers = ctx.redis.workers
    if workers is None:
        yield Problem(
            "workers.unknown",
            "the workers could not be pinged",
            "see that Redis accepts this host's connections (drip status)",
        )
    elif not workers:
        yield Problem(
            "workers.none",
            "no worker answered a ping: no email is being sent",
            "start `drip worker` (or `drip run`) on at least one host, with this DRIP_BROKER_URL",
        )
    else:
        ctx.notes["workers"] = f"{len(workers)} alive: {', '.join(workers)}"


@check("ticker", needs=("broker",))
def ticker_seen(ctx: Context) -> Iterator[Problem]:
    from drip.status import ago

    view = ctx.redis
    beat = view.heartbeat
    if beat is None:
        yield Problem(
            "ticker.never",
            "no tick has run since Redis started: nothing due is being claimed",
            "start `drip beat` (or `drip run`); its ticks run on a worker, so start one too",
        )
        return
    age = beat.age(view.checked_at)
    if beat.late(view.checked_at):
        yield Problem(
            "ticker.late",
            f"the last tick ran {ago(age)} ago on {beat.host}; beat sends one every "
            f"{beat.tick_seconds:g} s",
            "check that `drip beat` runs, and that the workers are not all stuck (drip status)",
        )
        return
    ctx.notes["ticker"] = f"last tick {ago(age)} ago on {beat.host}"


# --- mail -------------------------------------------------------------------------------------


@check("mail")
def mail_reachable(ctx: Context) -> Iterator[Problem]:
    transport = open_transport(ctx.settings.mail_url)
    if isinstance(transport, FileTransport):
        yield from _outbox_writable(transport.directory, ctx)
    elif isinstance(transport, SMTPTransport):
        yield from SmtpProbe(ctx.settings.mail_url, transport, ctx.ssl_context).run(ctx)


def _outbox_writable(directory: Path, ctx: Context) -> Iterator[Problem]:
    """file://: the folder (or the nearest existing folder above it, where it will be made)
    must be writable."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        yield Problem(
            "mail.outbox",
            f"emails go to files in {directory}, and {existing} is not a folder drip can write to",
            "give DRIP_MAIL_URL a folder this user can write, like file://var/outbox",
        )
        return
    ctx.notes["mail"] = f"emails are written as files into {directory} (no SMTP)"


@dataclass
class SmtpProbe:
    """Connect, EHLO, STARTTLS (when offered or required), AUTH (when credentials are given), as
    the SMTP transport does, then QUIT: no message is sent. smtplib directly, so every failure
    is named by its step."""

    url: str
    transport: SMTPTransport
    ssl_context: ssl.SSLContext | None = None
    _steps: list[str] = field(default_factory=list, init=False)  # what went well, for the note

    @property
    def where(self) -> str:
        return f"{self.transport.host}:{self.transport.port}"

    def run(self, ctx: Context) -> Iterator[Problem]:
        try:
            smtp = self._connect()
        except ssl.SSLCertVerificationError as e:
            yield self._untrusted(e)
            return
        except (OSError, smtplib.SMTPException) as e:
            yield Problem(
                "mail.unreachable",
                f"cannot connect to the mail server {self.where}: {describe(e)}",
                "check DRIP_MAIL_URL's host and port, and that the server runs and lets this host"
                " connect",
            )
            return
        try:
            found = list(self._converse(smtp))
        except ssl.SSLCertVerificationError as e:
            found = [self._untrusted(e)]
        except (OSError, smtplib.SMTPException) as e:
            found = [Problem(
                "mail.dropped",
                f"the mail server {self.where} ended the conversation: {describe(e)}",
                "see the mail server's log; check DRIP_MAIL_URL",
            )]  # fmt: skip
        finally:
            _quit(smtp)
        yield from found
        if not any(p.severity == ERROR for p in found):
            ctx.notes["mail"] = f"{self.where}: {', '.join(self._steps)}; no message sent"

    def _connect(self) -> smtplib.SMTP:
        host, port = self.transport.host, self.transport.port
        timeout = min(self.transport.timeout, SMTP_TIMEOUT)
        self._steps = ["connected"]
        if self.transport.tls == "implicit":
            self._steps.append("TLS")
            return smtplib.SMTP_SSL(host, port, timeout=timeout, context=self._context())
        return smtplib.SMTP(host, port, timeout=timeout)

    def _converse(self, smtp: smtplib.SMTP) -> Iterator[Problem]:
        smtp.ehlo_or_helo_if_needed()
        self._steps.append("EHLO")
        encrypted = self.transport.tls == "implicit"
        if not encrypted:
            problem = self._plain(smtp) if self.transport.tls == "none" else self._starttls(smtp)
            if problem is not None:
                yield problem
                if problem.severity == ERROR:
                    return
            encrypted = smtp.sock is not None and isinstance(smtp.sock, ssl.SSLSocket)
        if self.transport.credentials is not None:
            username, password = self.transport.credentials
            clear = self.transport.tls == "none"  # the operator's explicit choice, as it sends
            yield from self._login(smtp, username, password, encrypted or clear)

    def _plain(self, smtp: smtplib.SMTP) -> Problem | None:
        """?tls=none: the transport never uses STARTTLS, even when offered, and sends the
        password in plain text; the probe does the same, and warns only about the network."""
        if _loopback(self.transport.host):
            return None
        return Problem(
            "mail.unencrypted",
            f"DRIP_MAIL_URL has ?tls=none: emails to {self.where}, with patients' names and "
            "addresses (and the password, if any), cross the network unencrypted",
            "drop ?tls=none unless the relay runs on this host or a network you trust",
            WARNING,
        )

    def _starttls(self, smtp: smtplib.SMTP) -> Problem | None:
        if smtp.has_extn("starttls"):
            smtp.starttls(context=self._context())
            smtp.ehlo()
            self._steps.append("STARTTLS")
            return None
        if self.transport.tls == "required":
            return Problem(
                "mail.starttls-missing",
                f"{self.where} does not offer STARTTLS, and DRIP_MAIL_URL has ?tls=required: "
                "no email would be sent",
                "use a server (or port, usually 587) that offers STARTTLS, or smtps:// for "
                "implicit TLS (port 465)",
            )
        if self.transport.credentials is not None:
            return Problem(
                "mail.auth-unencrypted",
                f"{self.where} does not offer STARTTLS, and drip never sends DRIP_MAIL_URL's "
                "password unencrypted: no email would be sent",
                "use smtps:// (port 465) or a server that offers STARTTLS (usually port 587)",
            )
        if _loopback(self.transport.host):
            return None
        return Problem(
            "mail.unencrypted",
            f"{self.where} does not offer STARTTLS: emails, with patients' names and addresses, "
            "would cross the network unencrypted",
            "use a relay that offers STARTTLS, and add ?tls=required to DRIP_MAIL_URL",
            WARNING,
        )

    def _login(
        self, smtp: smtplib.SMTP, username: str, password: str, encrypted: bool
    ) -> Iterator[Problem]:
        if not encrypted:
            return  # said by _starttls
        if not smtp.has_extn("auth"):
            yield Problem(
                "mail.auth-not-offered",
                f"DRIP_MAIL_URL gives a user name, and {self.where} offers no AUTH",
                "remove the user name and password from DRIP_MAIL_URL, or use the relay's "
                "submission port (usually 587)",
            )
            return
        try:
            smtp.login(username, password)
        except smtplib.SMTPAuthenticationError as e:
            yield Problem(
                "mail.auth-refused",
                f"{self.where} refused the user name and password in DRIP_MAIL_URL: "
                f"{describe(e)}",
                "check them (an @, : or / in them is written %40, %3A, %2F)",
            )
            return
        self._steps.append("AUTH")

    def _untrusted(self, error: ssl.SSLCertVerificationError) -> Problem:
        return Problem(
            "mail.tls-certificate",
            f"{self.where}'s TLS certificate is not trusted: {error.verify_message}",
            "name the server in DRIP_MAIL_URL as its certificate does; for a private CA, give "
            "its certificate with ?cafile=/path/to/ca.pem",
        )

    def _context(self) -> ssl.SSLContext:
        """The transport's own (?cafile= as drip.transports.url loaded it, else the system's
        store), unless a caller gave one."""
        return self.ssl_context or self.transport.tls_context()


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


# --- settings ---------------------------------------------------------------------------------


@check("secret-key")
def secret_key_set(ctx: Context) -> Iterator[Problem]:
    if ctx.settings.secret_key_generated:
        path = ctx.settings.var_dir / "secret_key"
        yield Problem(
            "secret-key.generated",
            f"DRIP_SECRET_KEY is not set: unsubscribe links are signed with the key generated "
            f"into {path}, which is lost with var/ and differs on every host",
            f"set DRIP_SECRET_KEY, the same on every host (make one with: {MAKE_KEY}); to keep "
            f"the links already sent working, put the generated key after it: "
            f"DRIP_SECRET_KEY=<new>,<the contents of {path}>",
        )


@check("public-url")
def public_url_https(ctx: Context) -> Iterator[Problem]:
    url = ctx.settings.public_url
    parts = urlsplit(url)
    local = _loopback(parts.hostname or "")
    files = ctx.settings.mail_url.startswith("file:")
    if local and not files:
        yield Problem(
            "public-url.loopback",
            f"DRIP_PUBLIC_URL={url} is this machine: patients cannot open the unsubscribe "
            "links in the emails drip sends them",
            "set DRIP_PUBLIC_URL to the https address where `drip serve` is reachable",
        )
    elif parts.scheme != "https" and not local:
        yield Problem(
            "public-url.http",
            f"DRIP_PUBLIC_URL={url} is not https: mail providers ignore one-click unsubscribe "
            "(RFC 8058) over http",
            "serve drip over https and set DRIP_PUBLIC_URL to that address",
            WARNING,
        )
    else:
        ctx.notes["public-url"] = url + (" (emails go to files: fine for trying drip)" * local)


@check("send-window")
def send_window_sane(ctx: Context) -> Iterator[Problem]:
    window = ctx.settings.send_window
    fix = "set DRIP_SEND_WINDOW to daytime hours, like 09:00-19:00"
    if window.start < 7 * 60 or window.end > 21 * 60:
        yield Problem(
            "send-window.night",
            f"DRIP_SEND_WINDOW={window} lets emails arrive at night in patients' time zones",
            fix,
            WARNING,
        )
    elif window.end - window.start < 4 * 60:
        yield Problem(
            "send-window.short",
            f"DRIP_SEND_WINDOW={window} is shorter than 4 hours: a backlog may take days",
            fix,
            WARNING,
        )
    else:
        ctx.notes["send-window"] = f"{window}, patients' local time"


@check("campaigns")
def campaigns_lint_clean(ctx: Context) -> Iterator[Problem]:
    from drip import lint

    try:
        report = lint.validate(ctx.settings, now=ctx.now)
    except DripError as e:
        yield Problem("campaigns.none", str(e), "set DRIP_TEMPLATES_DIR to the campaigns' folder")
        return
    fix = "fix it and run `drip campaigns validate`"
    for finding in report.findings[:MAX_LINT_FINDINGS]:
        yield Problem(f"campaigns.{finding.code}", str(finding), fix)
    if len(report.findings) > MAX_LINT_FINDINGS:
        more = len(report.findings) - MAX_LINT_FINDINGS
        yield Problem("campaigns.more", f"and {more} more", "see `drip campaigns validate`")
    ctx.notes["campaigns"] = report.summary()


@check("permissions")
def private_files(ctx: Context) -> Iterator[Problem]:
    for line in loose_permissions(ctx.settings):
        problem, _, command = line.rpartition(": chmod ")
        yield Problem("permissions.loose", problem, f"chmod {command}")


# --- files of patients' data ------------------------------------------------------------------


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
