"""The real `drip` executable, as a coordinator runs it: exit codes, messages, no tracebacks."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from drip.cli import App, cli
from tests.conftest import TEST_SECRET
from tests.polling import wait_until

DRIP = [sys.executable, "-m", "drip"]


def run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m drip ARGS` in `cwd`, with no DRIP_* variable but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
    return subprocess.run(
        [*DRIP, *args], env=clean | env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_upgrade_enroll_and_timeline_on_a_real_database(db_url: str, tmp_path: Path) -> None:
    env = {"DRIP_DATABASE_URL": db_url, "DRIP_NOW": "2026-10-30T14:00:00Z"}
    assert run("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    enrolled = run(
        "enroll",
        "ana@example.com",
        "--campaign",
        "ketamine-onboarding",
        "--first-name",
        "Ana",
        "--timezone",
        "Europe/London",
        "--first-session",
        "2026-11-10",
        env=env,
        cwd=tmp_path,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    shown = run("timeline", "ana@example.com", "--json", env=env, cwd=tmp_path)
    rows = json.loads(shown.stdout)
    assert len(rows) == 8
    for row in rows:
        assert {"step", "due_at", "local_time", "state"} <= set(row)
    assert rows[0]["local_time"] == "2026-10-30T14:00:00+00:00"  # GMT in London


def test_the_embedded_default_database_lives_under_var(tmp_path: Path) -> None:
    env = {"DRIP_DATABASE_URL": "", "DRIP_SECRET_KEY": ""}
    assert run("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    assert (tmp_path / "var" / "drip.db").exists()


def test_a_command_before_db_upgrade_says_to_run_it(tmp_path: Path) -> None:
    result = run("timeline", "a@example.com", env={"DRIP_DATABASE_URL": ""}, cwd=tmp_path)
    assert result.returncode == 1
    assert "run `drip db upgrade` first" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DRIP_SEND_WINDOW": "late"}, "DRIP_SEND_WINDOW"),
        ({"DRIP_DATABASE_URL": "oracle://x"}, "DRIP_DATABASE_URL"),
        ({"DRIP_CLINIC_TIMEZONE": "Nowhere"}, "DRIP_CLINIC_TIMEZONE"),
        ({"DRIP_NOW": "9999-12-31T23:59:59"}, "DRIP_NOW"),
        ({"DRIP_DATABASE_URL": "postgresql+nope://u:pw@db.example/drip"}, "DRIP_DATABASE_URL"),
    ],
)
def test_a_bad_setting_is_exit_1_naming_the_variable(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    result = run("timeline", "a@example.com", env=env, cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_help_works_even_with_a_bad_environment(tmp_path: Path) -> None:
    result = run("enroll", "--help", env={"DRIP_SEND_WINDOW": "late"}, cwd=tmp_path)
    assert result.returncode == 0 and "--csv" in result.stdout


def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    env = {"DRIP_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    result = run("timeline", "a@example.com", env=env, cwd=tmp_path)
    assert result.returncode == 1 and "cannot open the database" in result.stderr
    assert "Traceback" not in result.stderr


def test_campaigns_list_json_shape(tmp_path: Path) -> None:
    result = run("campaigns", "list", "--json", env={}, cwd=tmp_path)
    [campaign] = json.loads(result.stdout)
    assert campaign["slug"] == "ketamine-onboarding" and campaign["steps"][0] == "welcome"


def test_ctrl_c_while_a_command_waits_for_the_database_is_one_line_and_exit_130(
    tmp_path: Path,
) -> None:
    """`drip enroll` blocked on a SQLite database another process holds (drip waits 30 s for
    the lock), interrupted: one line, the shell's 130, no traceback."""
    database = tmp_path / "drip.db"
    env = {"DRIP_DATABASE_URL": f"sqlite:///{database}"}
    assert run("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held until the test ends
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
    child = subprocess.Popen(
        [*DRIP, "enroll", "ann@example.com", "--campaign", "ketamine-onboarding",
         "--first-name", "Ann"],
        env=clean | env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Ready once the child has the database open: it is then inside the command, waiting.
        wait_until(lambda: _has_open(child.pid, database), "drip enroll to open the database")
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
        holder.close()
    assert child.returncode == 130, err
    assert err.strip() == "interrupted" and "Traceback" not in err


def _has_open(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())
    except OSError:
        return False


def test_a_file_that_is_not_a_sqlite_database_is_named_not_a_traceback(
    tmp_path: Path,
) -> None:
    """Found by trying it: a text file given as the database gave a DatabaseError traceback."""
    fake = tmp_path / "notdb.db"
    fake.write_text("hello\n")
    environ = {"DRIP_DATABASE_URL": f"sqlite:///{fake}", "DRIP_SECRET_KEY": TEST_SECRET}
    for args in (["timeline", "a@example.com"], ["db", "upgrade"]):
        result = CliRunner().invoke(cli, args, obj=App(environ=environ))
        assert result.exit_code == 1, result.output
        assert "not a SQLite database" in result.output and "Traceback" not in result.output


def test_a_scheme_less_value_with_a_colon_is_not_echoed_whole() -> None:
    result = CliRunner().invoke(
        cli, ["timeline", "a@example.com"],
        obj=App(environ={"DRIP_DATABASE_URL": "admin:s3cretPW", "DRIP_SECRET_KEY": TEST_SECRET}),
    )  # fmt: skip
    assert result.exit_code == 1 and "s3cretPW" not in result.output


def test_csv_json_gets_json_when_the_whole_file_is_refused(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'd.db'}"
    environ = {"DRIP_DATABASE_URL": database, "DRIP_SECRET_KEY": TEST_SECRET}
    runner = CliRunner()
    assert runner.invoke(cli, ["db", "upgrade"], obj=App(environ=environ)).exit_code == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("mail,name\nx@example.com,X\n")
    for path in (bad, tmp_path / "missing.csv"):
        args = ["enroll", "--csv", str(path), "--campaign", "ketamine-onboarding", "--json"]
        result = runner.invoke(cli, args, obj=App(environ=environ))
        assert result.exit_code == 1
        said = json.loads(result.stdout)
        assert said["enrolled"] == 0 and said["error"]


def test_a_name_typed_in_another_encoding_says_so() -> None:
    from drip.errors import InputError
    from drip.patients import check_name

    raw = b"Jos\xe9".decode("utf-8", "surrogateescape")  # what argv holds for Latin-1 bytes
    with pytest.raises(InputError) as caught:
        check_name(raw, "--first-name", required=True)
    assert "not UTF-8" in str(caught.value) and "0xE9" in str(caught.value)


@pytest.mark.parametrize("command", ["worker", "beat", "run"])
def test_worker_beat_and_run_refuse_an_unreachable_broker_at_once_naming_it_and_the_fix(
    drip: Callable[..., Result], command: str
) -> None:
    """Not Celery's endless connection retries: one line, exit 1, within a few seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens once the socket is closed
    url = f"redis://:s3cretPW@127.0.0.1:{closed}/0"
    result = drip(command, env={"DRIP_BROKER_URL": url})
    assert result.exit_code == 1, result.output
    assert f"Redis unreachable at redis://:***@127.0.0.1:{closed}/0" in result.output
    assert "fix DRIP_BROKER_URL" in result.output and "s3cretPW" not in result.output
