"""The files holding patients' names and addresses are for their owner only (issue 9)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from drip import db
from drip.cli import App, cli
from drip.doctor import loose_permissions
from drip.settings import Settings
from drip.transports.file import FileTransport
from tests.conftest import TEST_SECRET


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask of most accounts, under which files are made world-readable."""
    before = os.umask(0o022)
    yield
    os.umask(before)


def mode(path: Path) -> str:
    return stat.filemode(path.stat().st_mode)


def test_a_new_sqlite_database_and_its_folders_are_the_owner_s_alone(tmp_path: Path) -> None:
    path = tmp_path / "new" / "data" / "drip.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    with engine.connect():  # the -wal and -shm files exist while a connection is open
        assert mode(path) == "-rw-------"
        assert mode(path.with_name("drip.db-wal")) == "-rw-------"
        assert mode(path.with_name("drip.db-shm")) == "-rw-------"
    engine.dispose()
    assert mode(tmp_path / "new") == mode(path.parent) == "drwx------"


def test_the_default_var_folder_and_database_are_the_owner_s_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"DRIP_SECRET_KEY": TEST_SECRET, "DRIP_NOW": "2026-10-30T14:00:00Z"}
    result = CliRunner().invoke(cli, ["db", "upgrade"], obj=App(environ=env))
    assert result.exit_code == 0, result.output
    assert mode(tmp_path / "var") == "drwx------"
    assert mode(tmp_path / "var" / "drip.db") == "-rw-------"
    Settings.from_env({})  # generates var/secret_key
    assert mode(tmp_path / "var" / "secret_key") == "-rw-------"


def test_a_new_outbox_folder_is_the_owner_s_alone(tmp_path: Path) -> None:
    with FileTransport(tmp_path / "var" / "outbox") as transport:
        transport.send("care@clinic.example", "ann@example.org", b"Subject: hi\r\n\r\nhello\r\n")
    assert mode(tmp_path / "var") == mode(tmp_path / "var" / "outbox") == "drwx------"
    (eml,) = (tmp_path / "var" / "outbox").glob("*.eml")
    assert mode(eml) == "-rw-------"


def test_an_existing_folder_is_left_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir(mode=0o755)
    engine = db.make_engine(f"sqlite:///{tmp_path / 'shared' / 'drip.db'}")
    db.upgrade(engine)
    engine.dispose()
    assert mode(tmp_path / "shared") == "drwxr-xr-x"


def test_loose_permissions_names_each_open_file_and_its_fix(tmp_path: Path) -> None:
    var = tmp_path / "var"
    var.mkdir(mode=0o755)
    database = var / "drip.db"
    database.write_bytes(b"")
    database.chmod(0o644)
    (var / "drip.db-wal").write_bytes(b"")
    (var / "drip.db-wal").chmod(0o640)
    outbox = var / "outbox"
    outbox.mkdir(mode=0o755)
    settings = Settings(
        database_url=f"sqlite:///{database}", mail_url=f"file://{outbox}", var_dir=var
    )
    problems = loose_permissions(settings)
    assert problems == [
        f"{var} can be read by other users (drwxr-xr-x): chmod 700 {var}",
        f"{database} can be read by other users (-rw-r--r--): chmod 600 {database}",
        f"{var}/drip.db-wal can be read by other users (-rw-r-----): chmod 600 {var}/drip.db-wal",
        f"{outbox} can be read by other users (drwxr-xr-x): chmod 700 {outbox}",
    ]
    for line in problems:
        os.system(line.split(": ", 1)[1])  # the fix given is the fix
    assert loose_permissions(settings) == []


def test_loose_permissions_of_a_new_installation_is_empty(tmp_path: Path) -> None:
    assert loose_permissions(Settings(var_dir=tmp_path / "none yet")) == []
