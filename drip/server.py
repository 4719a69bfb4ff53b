"""`drip serve`: the web application (drip.web) under gunicorn, a production WSGI server, started
through gunicorn's application API rather than its command line, so drip's settings, checks and
messages come first and its exit codes hold: 0 after SIGTERM, 130 after Ctrl-C (SIGINT), 1 when
it cannot start (a port in use, a stale schema).

The master loads the application once (`preload_app`: a broken template stops `drip serve`
with its message, not a crash loop of workers), then forks the workers; each gets a fresh
connection pool. gunicorn's own logs go through RedactingLogger, which hides tokens in every
line (the access log, the error log, drip's log lines and tracebacks) as a second guard behind
drip.web.HideTokens.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import Flask
from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from drip import logs
from drip.errors import DripError, InputError
from drip.settings import Settings
from drip.web import create_app, database_problem, hide_tokens, schema_head, web_engine

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8025  # DRIP_PUBLIC_URL's default, http://127.0.0.1:8025
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MOST_WORKERS = 8
TIMEOUT = 30  # seconds a worker may spend on one request before gunicorn replaces it
GRACEFUL_TIMEOUT = 10  # seconds requests in progress get to finish after SIGTERM
WARNING = "warning: "

log = logging.getLogger("drip.serve")


def default_workers() -> int:
    """gunicorn's advice, (2 x cores) + 1, at most MOST_WORKERS: pages are small and fast, and
    every worker holds its own database connection."""
    return min(2 * (os.cpu_count() or 1) + 1, MOST_WORKERS)


def default_address(public_url: str) -> tuple[str, int]:
    """Where to listen when --host/--port are not given: DRIP_PUBLIC_URL's host and port when it
    is a plain http URL on this machine (trying drip locally, where the links in the emails
    must reach this server), else 127.0.0.1:8025, behind the TLS reverse proxy that
    DRIP_PUBLIC_URL names."""
    parts = urlsplit(public_url)
    if parts.scheme == "http" and parts.hostname in LOOPBACK:
        return parts.hostname or DEFAULT_HOST, parts.port or 80
    return DEFAULT_HOST, DEFAULT_PORT


def check_port(host: str, port: int) -> None:
    """Bind once, as gunicorn will, to turn a port in use (which gunicorn retries five times,
    then logs) into one message with the fix."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror:
        raise InputError("--host", f"{host!r} is not a host name or address") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise DripError(_cannot_listen(host, port, e)) from None


def _cannot_listen(host: str, port: int, error: OSError) -> str:
    where = f"{host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: the port is in use (another drip serve, or another "
            "program); stop that one, or give another port with --port (and point the reverse "
            "proxy, or DRIP_PUBLIC_URL, at it)"
        )
    if error.errno == errno.EACCES:
        return (
            f"cannot listen on {where}: ports below 1024 need root; run drip serve on a higher "
            f"port (the default is {DEFAULT_PORT}) behind a reverse proxy that listens on 443"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return (
            f"cannot listen on {where}: {host} is not an address of this machine; use "
            "127.0.0.1 (a proxy on this machine) or 0.0.0.0 (every network interface)"
        )
    return f"cannot listen on {where}: {error.strerror}"


def check_database(settings: Settings) -> str | None:
    """A warning when the database cannot be reached now (the server starts anyway: /healthz
    answers 503 until it can, as a server started before its database must); DripError when it
    can and its schema is not this drip's (run `drip db upgrade` first)."""
    engine = web_engine(settings)
    try:
        problem = database_problem(engine, schema_head())
    finally:
        engine.dispose()
    if problem is None:
        return None
    if problem.startswith("database unreachable"):
        return (
            f"{problem}; serving anyway: until it can be reached, /healthz answers 503 and "
            "patients are asked to try again later"
        )
    raise DripError(problem)


class TokenFilter(logging.Filter):
    """Hides tokens in a log record's message and traceback, whatever logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = hide_tokens(message)
        if hidden != message:
            record.msg, record.args = hidden, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = hide_tokens(record.exc_text)
        return True


class RedactingLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's logger, its handlers filtered by TokenFilter; drip's own loggers (drip.web's
    unsubscribe lines, Flask's errors) write through the same handlers, at INFO."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        handlers = [*self.error_log.handlers, *self.access_log.handlers]
        for handler in handlers:
            if not any(isinstance(f, TokenFilter) for f in handler.filters):
                handler.addFilter(TokenFilter())
        drip = logging.getLogger("drip")
        drip.handlers = list(self.error_log.handlers)
        drip.setLevel(logging.INFO)
        drip.propagate = False
        for name in ("werkzeug", "flask"):  # not used under gunicorn; guarded all the same
            logging.getLogger(name).addFilter(TokenFilter())


class _Arbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's master, remembering that it was stopped by Ctrl-C (SIGINT)."""

    interrupted = False

    def handle_int(self) -> None:
        self.interrupted = True
        super().handle_int()


class Server(BaseApplication):  # type: ignore[misc]
    """drip.web's application under gunicorn, configured here and nowhere else (no gunicorn
    config file or GUNICORN_CMD_ARGS is read)."""

    def __init__(self, load: Callable[[], Flask], options: dict[str, Any]) -> None:
        self.loader = load
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.loader()

    def serve(self) -> int:
        """Run until stopped; the exit code (0 after SIGTERM, 130 after SIGINT). A worker that
        gunicorn forked comes back here too when it ends: its exit is gunicorn's business."""
        arbiter = _Arbiter(self)
        try:
            arbiter.run()
        except SystemExit as e:
            if os.getpid() != arbiter.pid:
                raise
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            return 130 if arbiter.interrupted and code == 0 else code
        return 0


def _after_fork(server: Arbiter, worker: Any) -> None:
    """A worker's connections are its own: drop any pool entries inherited from the master
    (it makes none, but a pooled connection shared by two processes would corrupt both)."""
    app = server.app.wsgi()
    app.extensions["drip"].engine.dispose(close=False)


def options(host: str, port: int, workers: int, settings: Settings) -> dict[str, Any]:
    """gunicorn's settings; its logs (error, access, and every other logger) in
    DRIP_LOG_FORMAT, through drip.logs."""
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "bind": [bind],
        "workers": workers,
        "worker_class": "sync",
        "timeout": TIMEOUT,
        "graceful_timeout": GRACEFUL_TIMEOUT,
        "preload_app": True,
        "post_fork": _after_fork,
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": "info",
        "logger_class": RedactingLogger,
        "logconfig_dict": logs.gunicorn_logconfig(settings),
        "proc_name": "drip-serve",
    }


def serve(
    settings: Settings,
    *,
    host: str | None,
    port: int | None,
    workers: int | None,
    say: Callable[[str], None],
) -> int:
    """Check, then run gunicorn until it is stopped; the exit code. Under DRIP_LOG_FORMAT=json
    what it says before gunicorn starts is a log line too (`warning: …` a warning)."""
    if settings.log_format == "json":
        logs.configure(settings, process="serve")
        say = _log_line
    default_host, default_port = default_address(settings.public_url)
    host, port = host or default_host, port or default_port
    workers = workers or default_workers()
    check_port(host, port)
    if warning := check_database(settings):
        say(f"warning: {warning}")
    if not settings.public_url.startswith("https://"):
        say(
            f"warning: DRIP_PUBLIC_URL={settings.public_url} is not https: fine on this machine; "
            "for patients, put drip serve behind a TLS reverse proxy and set DRIP_PUBLIC_URL to "
            "its https address (mail providers offer one-click unsubscribe only over https)"
        )
    say(
        f"drip serve: http://{host}:{port} with {workers} worker(s); unsubscribe links in emails "
        f"point to {settings.public_url}; Ctrl-C stops"
    )
    return Server(lambda: create_app(settings), options(host, port, workers, settings)).serve()


def _log_line(line: str) -> None:
    if line.startswith(WARNING):
        log.warning(line.removeprefix(WARNING))
    else:
        log.info(line)
