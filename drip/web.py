"""The web application of `drip serve`: the unsubscribe page (RFC 8058 one-click) and /healthz.

`create_app(settings)` is the one factory: `drip serve` runs it under gunicorn (drip.server),
so do `gunicorn 'drip.web:create_app()'` (docker-compose; with no argument the settings come
from the environment) and the tests.

- `GET /unsubscribe/<token>` shows a page with one button and changes nothing: link scanners in
  clinics' and patients' mail systems open every link of every email.
- `POST /unsubscribe/<token>` with the form field `List-Unsubscribe=One-Click` (what a mail
  provider sends for RFC 8058, and what the page's button sends) unsubscribes, in one
  transaction, idempotently, and answers 200 with a page saying what stopped. No cookie, no
  redirect, no login: the signed token is the whole credential.
- `GET /healthz`: 200 `ok` when the database answers and its schema is current, else 503 and
  the reason (no stack trace, no URL).
- `GET /metrics`: the database's figures as Prometheus text (drip.metrics), read at each
  scrape through a read-only engine; `drip_database_up 0` when the database cannot be read.

Every response carries SECURITY_HEADERS and a Content-Security-Policy that lets a page load
nothing (its one stylesheet is inline, allowed by its hash). A token is a credential, so no log
line shows one: after each request the path in the WSGI environ reads `/unsubscribe/…` (any
WSGI server's access log reads it from there), and errors are logged by route, not by path.
Pages show clinic settings only: never a patient's name or address, nothing from the request.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import psycopg
from alembic.script import ScriptDirectory
from flask import Blueprint, Flask, Response, current_app, render_template, request
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from werkzeug.exceptions import BadRequest, HTTPException, NotFound

from drip import db
from drip.clock import Clock
from drip.metrics import database_registry
from drip.paths import WEB_TEMPLATES
from drip.settings import Settings
from drip.unsubscribe import Unsubscribed, subscriber, unsubscribe
from drip.urls import redact

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("drip.web")

ONE_CLICK = ("List-Unsubscribe", "One-Click")  # RFC 8058 §3.1: the body, as a form field
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
MAX_BODY = 16 * 1024  # the one-click body is 26 bytes; a form with the button's field, a few more
BUSY_MS = 5_000  # SQLite: how long a request waits for another process's write lock
CONNECT_SECONDS = 5  # PostgreSQL: how long to wait for a connection (then 503)
STATEMENT_MS = 10_000  # PostgreSQL: how long one statement may wait (a lock) before a 503
HEALTH_MS = 2_000  # PostgreSQL: /healthz's own statement timeout
ATTEMPTS = 3  # an unsubscribe that loses a race (a unique index, a deadlock) is tried again
SOURCES = {"page": "page"}  # the button's `via` value -> the source recorded; else "one-click"
DATABASE_ERRORS = (DBAPIError, sqlite3.Error, psycopg.Error, PoolTimeout)
HIDDEN = "…"
_TOKEN_IN_PATH = re.compile(r"(?i)(/unsubscribe(?:/|%2f))[^\s?#\"']*")


def hide_tokens(line: str) -> str:
    """`line` with whatever follows `/unsubscribe/` (a token) replaced by `…`."""
    return _TOKEN_IN_PATH.sub(rf"\g<1>{HIDDEN}", line)


@dataclass(frozen=True)
class Clinic:
    """What the pages say about the clinic (settings, never a patient's data)."""

    name: str
    address: str
    phone: str
    tel: str  # the phone's digits for a tel: link, or "" when it has too few to call

    @classmethod
    def of(cls, settings: Settings) -> Clinic:
        number = re.match(r"\s*(\+?[\d(][\d\s().-]*)", settings.clinic_phone)
        digits = re.sub(r"\D", "", number[1]) if number else ""
        plus = "+" if number and number[1].startswith("+") else ""
        tel = plus + digits if len(digits) >= 3 else ""
        return cls(settings.clinic_name, settings.clinic_address, settings.clinic_phone, tel)


@dataclass(frozen=True)
class Web:
    """What the requests share: settings, the database, the clock, the page's CSS and headers."""

    settings: Settings
    engine: Engine
    clock: Clock
    clinic: Clinic
    css: str
    headers: dict[str, str]
    schema_head: str | None
    reader: Engine  # read-only, for /metrics (drip.db.make_reader)
    metrics: CollectorRegistry


def security_headers(css: str) -> dict[str, str]:
    """The headers of every response: nothing may be loaded from anywhere (the inline stylesheet
    is allowed by its hash), forms post only here, no page in a frame, no Referer sent on
    (it would carry the token), nothing cached, nothing sniffed, nothing indexed."""
    digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
    policy = (
        f"default-src 'none'; style-src 'sha256-{digest}'; img-src 'none'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "X-Robots-Tag": "noindex, nofollow",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


def web_engine(settings: Settings) -> Engine:
    """The server's engine: short waits (a request answers 503 rather than hang), no query
    parameters in error messages (they hold public ids), and a SQLite file opened, never
    created: a server pointed at the wrong path says so at /healthz instead of serving an empty
    database."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        return db.make_engine(_existing_sqlite(settings.database_url), busy_ms=BUSY_MS,
                              hide_parameters=True)  # fmt: skip
    return db.make_engine(
        settings.database_url,
        hide_parameters=True,
        connect_args={"connect_timeout": CONNECT_SECONDS},
    )


def _existing_sqlite(url: str) -> str:
    """A SQLite URL as a `file:` URI in mode=rw: SQLite opens the file, and fails if it is not
    there, where a plain path would create it (drip.db.make_engine creates the file too)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return url
    path = quote(str(Path(database).absolute()))
    return f"sqlite:///file:{path}?mode=rw&uri=true"


class DripFlask(Flask):
    """Flask, with every template autoescaped and exceptions logged by route, not by path."""

    def select_jinja_autoescape(self, filename: str | None) -> bool:
        return True

    def log_exception(self, exc_info: Any) -> None:
        rule = request.url_rule.rule if request.url_rule else "(no route)"
        self.logger.error("exception on %s [%s]", rule, request.method, exc_info=exc_info)


def create_app(settings: Settings | None = None) -> Flask:
    """The application; `settings` default to the environment's (DRIP_*)."""
    settings = settings or Settings.from_env()
    app = DripFlask(__name__, template_folder=str(WEB_TEMPLATES), static_folder=None)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY, MAX_FORM_MEMORY_SIZE=MAX_BODY)
    app.url_map.merge_slashes = False  # werkzeug would redirect `//x` (a redirect is not one-click)
    css = (WEB_TEMPLATES / "page.css").read_text(encoding="utf-8")
    reader = db.make_reader(settings.database_url)
    app.extensions["drip"] = Web(
        settings=settings,
        engine=web_engine(settings),
        clock=settings.clock(),
        clinic=Clinic.of(settings),
        css=css,
        headers=security_headers(css),
        schema_head=schema_head(),
        reader=reader,
        metrics=database_registry(reader, settings.clock()),
    )
    app.register_blueprint(pages)
    app.register_blueprint(health)
    app.register_blueprint(metrics)
    # Blueprints still to come register here: /hooks/ses, /hooks/postmark, /hooks/generic
    # (signed relay notifications), DESIGN §5.
    app.after_request(_secure)
    app.register_error_handler(HTTPException, _http_problem)
    for error in DATABASE_ERRORS:
        app.register_error_handler(error, _database_down)
    app.register_error_handler(Exception, _failed)
    app.wsgi_app = HideTokens(app.wsgi_app)  # type: ignore[method-assign]
    return app


def schema_head() -> str | None:
    """The newest schema revision this drip ships (what /healthz wants the database at)."""
    return ScriptDirectory.from_config(db.alembic_config()).get_current_head()


def web() -> Web:
    found: Web = current_app.extensions["drip"]
    return found


# --- the unsubscribe page -----------------------------------------------------------------------

pages = Blueprint("unsubscribe", __name__)


@pages.get("/unsubscribe/<token>")
def ask(token: str) -> str:
    """The page with the button. Changes nothing."""
    if _has_body():
        raise BadRequest("A GET request for this page must not carry a body. Nothing was changed.")
    with _transaction() as session:
        found = subscriber(session, token=token, keys=web().settings.secret_keys)
    if found is None:
        raise _unknown_link()
    return _page("unsubscribe.html", "Unsubscribe", already=found.unsubscribed)


@pages.post("/unsubscribe/<token>")
def confirm(token: str) -> str:
    """One-click (RFC 8058) or the page's button: unsubscribes, or finds it already done."""
    if request.mimetype not in FORM_TYPES or request.form.get(ONE_CLICK[0]) != ONE_CLICK[1]:
        raise BadRequest(
            "To unsubscribe, send the form field List-Unsubscribe=One-Click "
            "(application/x-www-form-urlencoded or multipart/form-data), as the button on "
            "this page does. Nothing was changed."
        )
    source = SOURCES.get(request.form.get("via", ""), "one-click")
    done = _unsubscribe(token, source)
    if done is None:
        raise _unknown_link()
    if done.already:
        log.info("patient %d: unsubscribe again (%s), nothing to change", done.patient_id, source)
    else:
        log.info(
            "patient %d unsubscribed (%s): %d enrolment(s) ended, %d email(s) skipped, "
            "%d already on its way",
            done.patient_id, source, done.ended_enrolments, done.skipped, done.in_flight,
        )  # fmt: skip
    return _page("unsubscribed.html", "Unsubscribed", in_flight=done.in_flight)


def _has_body() -> bool:
    return (
        bool(request.content_length)
        or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    )


def _unsubscribe(token: str, source: str) -> Unsubscribed | None:
    """One transaction, tried again when it lost a race to another request for the same patient
    (the second attempt finds the work done and answers `already`)."""
    state = web()
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with _transaction() as session:
                return unsubscribe(
                    session, token=token, keys=state.settings.secret_keys,
                    now=state.clock.now(), source=source,
                )  # fmt: skip
        except (IntegrityError, OperationalError) as e:
            if attempt == ATTEMPTS or not _lost_a_race(e):
                raise
            log.info("unsubscribe lost a race (attempt %d of %d); trying again", attempt, ATTEMPTS)
    raise AssertionError("unreachable")


def _lost_a_race(error: DBAPIError) -> bool:
    """A unique index another transaction filled first, or PostgreSQL's deadlock or
    serialization failure: the same request, made again, succeeds."""
    if isinstance(error, IntegrityError):
        return db.is_unique_violation(error)
    return getattr(error.orig, "sqlstate", None) in ("40P01", "40001")


@contextmanager
def _transaction() -> Iterator[Session]:
    """One transaction; on PostgreSQL no statement waits longer than STATEMENT_MS."""
    engine = web().engine
    with Session(engine, expire_on_commit=False) as session, session.begin():
        if engine.dialect.name == "postgresql":
            session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_MS}"))
        yield session


def _unknown_link() -> NotFound:
    return NotFound("unsubscribe-link")


def _page(template: str, title: str, **values: Any) -> str:
    state = web()
    return render_template(template, title=title, clinic=state.clinic, css=state.css, **values)


# --- metrics ----------------------------------------------------------------------------------

metrics = Blueprint("metrics", __name__)


@metrics.get("/metrics")
def prometheus_metrics() -> Response:
    """The database's figures in Prometheus' text format 0.0.4, always 200 (see drip.metrics:
    `drip_database_up` says whether the database could be read)."""
    body = generate_latest(web().metrics)
    return Response(body, 200, content_type=CONTENT_TYPE_PLAIN_0_0_4)


# --- health -----------------------------------------------------------------------------------

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz() -> Response:
    """200 `ok` when the database answers and has the schema this drip needs; else 503 and why."""
    problem = database_problem(web().engine, web().schema_head)
    _note_health(problem)
    if problem is None:
        return Response("ok\n", 200, mimetype="text/plain")
    if problem.startswith(UNREACHABLE):  # the driver's words (host, port, database) stay in the log
        problem = f"{UNREACHABLE} (the reason is in drip serve's log)"
    return Response(f"{problem}\n", 503, mimetype="text/plain")


UNREACHABLE = "database unreachable"
_last_health: list[str | None] = [None]


def _note_health(problem: str | None) -> None:
    """Log the database's health when it changes (a load balancer asks every few seconds)."""
    if problem != _last_health[0]:
        if problem is not None:
            log.warning("/healthz: %s", problem)
        elif _last_health[0] is not None:
            log.info("/healthz: the database answers again")
        _last_health[0] = problem


def database_problem(engine: Engine, head: str | None) -> str | None:
    """Why the database cannot serve requests now, or None. A raw connection: SQLite's
    transactions start with BEGIN IMMEDIATE (drip.db), which would wait for a writer's lock."""
    try:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            if engine.dialect.name == "postgresql":
                cursor.execute(f"SET LOCAL statement_timeout = {HEALTH_MS}")
            cursor.execute("SELECT 1")
            try:
                cursor.execute("SELECT version_num FROM alembic_version")
                current = [row[0] for row in cursor.fetchall()]
            except DATABASE_ERRORS:
                current = []
        finally:
            raw.close()
    except DATABASE_ERRORS as e:
        return f"{UNREACHABLE}: {reason(e)}"
    if not current:
        return "database has no drip tables yet: run `drip db upgrade`"
    if current != [head]:
        return f"database schema is at {current[0]}, this drip needs {head}: run `drip db upgrade`"
    return None


def reason(error: BaseException) -> str:
    """A database error's first line, for /healthz and the log: the driver's words, with any
    URL in them shown without its password, never a traceback."""
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines()
    said = lines[0].strip() if lines else type(original).__name__
    said = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: redact(m[0]), said)
    return said[:300]


# --- every response ---------------------------------------------------------------------------


def _secure(response: Response) -> Response:
    response.headers.update(web().headers)
    return response


PROBLEMS: dict[int, tuple[str, str, list[str]]] = {
    # status: (title, heading, lines); 400's and 413's reason is the exception's description
    400: ("Request not understood", "This request could not be used", []),
    404: ("Page not found", "Page not found", ["There is no page at this address."]),
    405: ("Request not understood", "This request could not be used",
          ["This address answers only GET and POST requests. Nothing was changed."]),
    413: ("Request not understood", "This request could not be used",
          ["The request was too large. Nothing was changed."]),
}  # fmt: skip
UNKNOWN_LINK = (
    "Link not recognised",
    "This link does not work",
    [
        "It may have been cut short when it was copied, or it is not from one of our emails. "
        "Nothing was changed."
    ],
)
TO_STOP = "To stop the emails, use the Unsubscribe link at the bottom of any of them."
CLINIC_CAN_STOP = "If it still does not work, the clinic can stop the emails for you."


def _http_problem(error: HTTPException) -> tuple[str, int, dict[str, str]]:
    status = error.code or 500
    if status == 404 and error.description == _unknown_link().description:
        title, heading, lines = UNKNOWN_LINK
    else:
        title, heading, lines = PROBLEMS.get(status, PROBLEMS[400])
        if status == 400 and isinstance(error, BadRequest) and error.description:
            lines = [_own_words(error.description)]
    page = _problem(title, heading, lines, call=TO_STOP)
    allowed = getattr(error, "valid_methods", None)  # 405 says which methods it takes
    return page, status, {"Allow": ", ".join(allowed)} if allowed else {}


def _own_words(description: str) -> str:
    """Only the reasons this module wrote: werkzeug's own (a malformed form...) may quote the
    request, and a page echoes nothing from it."""
    if description.endswith("Nothing was changed."):
        return description
    return "The request was malformed. Nothing was changed."


def _database_down(error: Exception) -> tuple[str, int, dict[str, str]]:
    reference = secrets.token_hex(4)
    log.error("database unavailable (reference %s): %s", reference, reason(error))
    lines = [
        "The clinic's system could not be reached just now, so nothing was changed.",
        "Please try again in a few minutes.",
    ]
    page = _problem("Please try again later", "Please try again in a few minutes", lines,
                    call=CLINIC_CAN_STOP, reference=reference)  # fmt: skip
    return page, 503, {"Retry-After": "60"}


def _failed(error: Exception) -> tuple[str, int]:
    reference = secrets.token_hex(4)
    rule = request.url_rule.rule if request.url_rule else "(no route)"
    log.error("error on %s [%s] (reference %s)", rule, request.method, reference,
              exc_info=(type(error), error, error.__traceback__))  # fmt: skip
    lines = [
        "Something went wrong on our side, and your request may not have gone through.",
        "Please try again in a few minutes: pressing the button twice does no harm.",
    ]
    page = _problem("Something went wrong", "Something went wrong", lines,
                    call=CLINIC_CAN_STOP, reference=reference)  # fmt: skip
    return page, 500


def _problem(title: str, heading: str, lines: list[str], *, call: str = "",
             reference: str = "") -> str:  # fmt: skip
    return _page("problem.html", title, heading=heading, lines=lines, call=call,
                 reference=reference)  # fmt: skip


class HideTokens:
    """WSGI middleware: once the application has answered, the request's path in the environ
    reads `/unsubscribe/…`, so the server's access log (which reads RAW_URI, PATH_INFO and
    REQUEST_URI from the environ after the response) never shows a token. Percent-encoded
    spellings of the path are decoded first: the router decodes them too."""

    KEYS = ("RAW_URI", "REQUEST_URI", "PATH_INFO")

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return self.app(environ, start_response)
        finally:
            hide_path(environ)


def hide_path(environ: dict[str, Any]) -> None:
    for key in HideTokens.KEYS:
        value = environ.get(key)
        if isinstance(value, str):
            decoded = unquote(value)
            if hide_tokens(decoded) != decoded:
                environ[key] = hide_tokens(decoded.split("?", 1)[0])
