"""DRIP_LOG_FORMAT: one line per event, ids and states only; `json` is one JSON object a line
with the same fields in every process, Celery's own lines included."""

from __future__ import annotations

import json
import logging
import logging.config
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result

from drip import logs
from drip.settings import Settings
from tests.test_pipeline import (  # noqa: F401 - fixtures
    Pipeline,
    enrol_csv,
    pipeline,
    redis_url,  # noqa: F401 - the session's private redis-server
)

FIELDS = {"time", "level", "logger", "message", "service", "pid"}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() changes the root logger: put it back as the test found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_bad_log_format_is_a_start_up_error_naming_the_variable(
    drip: Callable[..., Result],
) -> None:
    result = drip("status", env={"DRIP_LOG_FORMAT": "xml"})
    assert result.exit_code == 1
    assert "DRIP_LOG_FORMAT='xml' is not a log format" in result.stderr
    assert "text (the default) or json" in result.stderr


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_the_fields_and_the_ids_a_call_gives(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure(Settings(log_format="json"), process="worker")
    log = logging.getLogger("drip.sending")
    log.warning("delivery %d %s", 7, "retry", extra={"delivery_id": 7, "patient_id": 3})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("batch failed")
    first, second = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert FIELDS <= set(first) and first["service"] == "worker"
    assert first["message"] == "delivery 7 retry" and first["level"] == "WARNING"
    assert first["logger"] == "drip.sending" and first["time"].endswith("Z")
    assert first["delivery_id"] == 7 and first["patient_id"] == 3
    assert "RuntimeError: boom" in second["exc_info"]  # the traceback, inside its one line


@pytest.mark.usefixtures("restore_logging")
def test_text_lines_name_the_process_and_the_cli_prints_warnings_plainly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure(Settings(), process="beat")
    logging.getLogger("drip.ticker").info("tick: %s", {"claimed": 2})
    logs.configure(Settings(), process="cli")
    logging.getLogger("drip.x").info("not shown: the CLI shows warnings only")
    logging.getLogger("drip.x").warning("shown as it is")
    tick, warning = capsys.readouterr().err.splitlines()
    assert " INFO drip.ticker [beat " in tick and tick.endswith("tick: {'claimed': 2}")
    assert warning == "shown as it is"


@pytest.mark.usefixtures("restore_logging")
def test_the_gunicorn_logconfig_writes_its_lines_as_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logging.config.dictConfig(logs.gunicorn_logconfig(Settings(log_format="json")))
    logging.getLogger("gunicorn.error").info("Booting worker with pid: %d", 42)
    logging.getLogger("gunicorn.access").info("GET /healthz 200")
    logging.getLogger("drip.web").warning("something")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["logger"], line["service"]) for line in lines] == [
        ("gunicorn.error", "serve"), ("gunicorn.access", "serve"), ("drip.web", "serve"),
    ]  # fmt: skip
    assert all(FIELDS <= set(line) for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_every_line_a_real_worker_and_ticker_write_is_json(
    drip: Callable[..., Result], pipeline: Pipeline  # noqa: F811
) -> None:
    env = pipeline.env | {"DRIP_LOG_FORMAT": "json"}
    patients = [f"p{i}@example.com,Patient{i},America/New_York," for i in range(24)]
    enrol_csv(drip, pipeline, ["ana@example.com,Ana,America/New_York,", *patients])
    worker = _start(pipeline, env, "worker", "--name=w1", "--concurrency=2")
    started = [worker, _start(pipeline, env, "beat")]
    pipeline.wait_settled()
    for process in started:
        process.terminate()
        assert process.wait(60) == 0
    for name in ("worker", "beat"):
        # no start-up banner; Celery writes its shutdown notice to stdout itself, unlogged
        shown = (pipeline.root / f"{name}.out").read_text().split()
        assert " ".join(shown) in ("", "worker: Warm shutdown (MainProcess)")
        lines = (pipeline.root / f"{name}.err").read_text().splitlines()
        assert lines, f"{name} wrote nothing"
        parsed = [json.loads(line) for line in lines]  # every line, or this raises
        assert all(FIELDS <= set(line) and line["service"] == name for line in parsed)
        text = "\n".join(lines)
        for personal in ("@example.com", "Ana", "Patient"):
            assert personal not in text
    said = [json.loads(line) for line in (pipeline.root / "worker.err").read_text().splitlines()]
    assert any(line["logger"].startswith("celery") for line in said)  # Celery's own lines
    batches = [line for line in said if line["message"].startswith("batch of")]
    assert batches and all(line.get("task_id") for line in batches)


def _start(pipeline: Pipeline, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:  # noqa: F811
    root: Path = pipeline.root
    with (root / f"{args[0]}.out").open("wb") as out, (root / f"{args[0]}.err").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "drip", *args], env=env, cwd=root, stdout=out, stderr=err
        )
    pipeline.processes.append(process)
    return process
