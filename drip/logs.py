"""Logging for every drip process: one line per event, ids and states only.

DRIP_LOG_FORMAT=text (the default) writes lines for people; `json` writes one JSON object a line
(python-json-logger), with the same fields in the worker, the ticker, `drip serve` and the CLI:

    time      ISO-8601 UTC, to the millisecond
    level     INFO, WARNING…
    logger    drip.sending, celery.worker.strategy…
    message   the line itself (ids and states: never a name or an address)
    service   worker, beat, serve, run or cli
    pid       the process id (each prefork pool process has its own)
    task_id, task_name   inside a Celery task
    …and any `extra=` a call gives, such as delivery_id or patient_id

Every process calls configure() once it has its settings. Celery's worker and beat would set
up logging their own way; drip.tasks answers Celery's `setup_logging` signal with configure(),
which Celery takes to mean "logging is done", so Celery's own lines (a task received, the
worker ready) come out in the same format. `drip serve` runs gunicorn with
gunicorn_logconfig(settings) as its `logconfig_dict`.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from drip.settings import Settings

SERVICES = ("worker", "beat", "serve", "run", "cli")
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(process)d"
RENAMED = {"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(service)s %(process)d] %(message)s"
CLI_TEXT_FORMAT = "%(message)s"  # as Python prints a warning when nothing is configured


class _Time:
    """formatTime as ISO-8601 UTC to the millisecond, for both formats."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        instant = datetime.fromtimestamp(record.created, UTC)
        return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DripJsonFormatter(_Time, JsonFormatter):
    """One JSON object a line, the fields above."""


class DripTextFormatter(_Time, logging.Formatter):
    """A line for people; the task's id at the end when there is one."""

    def __init__(self, fmt: str, service: str) -> None:
        super().__init__(fmt)
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        record.service = self.service
        line = super().format(record)
        task_id = getattr(record, "task_id", None)
        return f"{line} (task {task_id})" if task_id and task_id not in line else line


def formatter(log_format: str, service: str) -> logging.Formatter:
    """The formatter of `log_format` (text or json) for one kind of process; also what
    gunicorn_logconfig names, as a dictConfig factory."""
    if log_format == "json":
        return DripJsonFormatter(
            JSON_FIELDS, rename_fields=RENAMED, static_fields={"service": service}
        )
    return DripTextFormatter(CLI_TEXT_FORMAT if service == "cli" else TEXT_FORMAT, service)


class TaskIds(logging.Filter):
    """Inside a Celery task, give each record its task's id and name (a worker's lines about one
    batch can then be found together). Celery is not imported for it: the CLI has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        state = sys.modules.get("celery._state")
        task = state.get_current_task() if state is not None else None
        request_id = getattr(getattr(task, "request", None), "id", None)
        if request_id and not hasattr(record, "task_id"):
            record.task_id = request_id
            record.task_name = getattr(task, "name", None)
        return True


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is when a line is written (a test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure(settings: Settings, *, process: str, level: int | str = logging.INFO) -> None:
    """Send every log record of this process to stderr in DRIP_LOG_FORMAT. For the long-running
    processes `level` becomes the root logger's; the CLI only shows warnings, and leaves the
    root logger's level to whoever else listens (a test's log capture)."""
    if process not in SERVICES:
        raise ValueError(f"unknown process {process!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(old)
    handler = StderrHandler()
    handler.setFormatter(formatter(settings.log_format, process))
    handler.addFilter(TaskIds())
    if process == "cli":
        handler.setLevel(logging.WARNING)
    else:
        root.setLevel(level)
    root.addHandler(handler)
    logging.captureWarnings(True)  # a library's warning is a log line too, not a stray one


def gunicorn_logconfig(settings: Settings, level: str = "INFO") -> dict[str, Any]:
    """gunicorn's `logconfig_dict` for `drip serve`: its error and access logs, and every other
    logger, in DRIP_LOG_FORMAT on stderr. (gunicorn's access lines carry the request path: keep
    tokens out of its access_log_format, or leave the access log off.)"""
    handler = {"class": "drip.logs.StderrHandler", "formatter": "drip", "filters": ["task_ids"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "drip": {
                "()": "drip.logs.formatter",
                "log_format": settings.log_format,
                "service": "serve",
            }
        },
        "filters": {"task_ids": {"()": "drip.logs.TaskIds"}},
        "handlers": {"stderr": handler},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": level, "handlers": ["stderr"], "propagate": False},
        },
    }
