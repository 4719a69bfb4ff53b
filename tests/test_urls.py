"""No password from any URL in a message, a log line or a repr (issue 9)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy.engine import make_url

from drip.errors import DripError
from drip.settings import Settings
from drip.urls import redact
from tests.conftest import TEST_SECRET

# Each password, as typed into the URL; its distinctive pieces must never show.
PASSWORDS = ["s3cretPW", "pAss@w0rdX", "c0lon:s3cr3tY", "pct%40enc0dedZ", "sl/sh3dQ", "üñï€pwJ"]
SCHEMES = {
    "DRIP_DATABASE_URL": ["postgresql", "postgres", "postgresql+psycopg", "sqlite", "mysql"],
    "DRIP_BROKER_URL": ["redis", "rediss", "amqp"],
    "DRIP_MAIL_URL": ["smtp", "smtps", "file"],
}
SHAPES = [
    "{scheme}://admin:{pw}@db.internal:5432/drip",
    "{scheme}://:{pw}@db.internal/drip",
    "{scheme}:admin:{pw}@db.internal/drip",
    "{scheme}:{pw}@db.internal/drip",
    "admin:{pw}@db.internal/drip",
    "{scheme}//admin:{pw}@db.internal/drip",
    "{scheme}://admin:{pw}@db.internal/drip?sslmode=require",
    "{scheme}://admin:{pw}@",
    "{scheme}://db.internal/drip?password={pw}",
]


def pieces(password: str) -> list[str]:
    """The parts of a password a careless split could leave showing."""
    return [p for p in re.split(r"[@:/]|%40", password) if len(p) >= 4]


def cases() -> list[tuple[str, str, str]]:
    return [
        (name, shape.format(scheme=scheme, pw=pw), pw)
        for name, schemes in SCHEMES.items()
        for scheme in schemes
        for shape in SHAPES
        for pw in PASSWORDS
    ]


def assert_hidden(text: str, password: str) -> None:
    for piece in pieces(password):
        assert piece not in text, f"{piece!r} shows in {text!r}"


@pytest.mark.parametrize(("name", "url", "password"), cases())
def test_redact_hides_every_password_shape(name: str, url: str, password: str) -> None:
    assert_hidden(redact(url), password)


def test_redact_keeps_what_names_the_server() -> None:
    assert redact("postgresql://admin:s3cret@db:5432/drip") == "postgresql://admin:***@db:5432/drip"
    assert redact("postgresql:admin:s3cret@db/drip") == "postgresql:***@db/drip"
    assert redact("postgresql://drip@db/drip") == "postgresql://drip@db/drip"
    assert redact("sqlite:///var/drip.db") == "sqlite:///var/drip.db"
    assert redact("redis://h:6379/0?password=x&db=1") == "redis://h:6379/0?password=***&db=1"


@pytest.mark.parametrize(("name", "url", "password"), cases())
def test_no_password_in_a_config_error_or_the_settings_repr(
    name: str, url: str, password: str, tmp_path: Path
) -> None:
    env = {name: url, "DRIP_SECRET_KEY": TEST_SECRET, "DRIP_NOW": "2026-10-30T14:00:00Z"}
    try:
        settings = Settings.from_env(env)
    except DripError as e:
        assert_hidden(str(e), password)
    else:
        assert_hidden(repr(settings), password)
        assert TEST_SECRET not in repr(settings)


def test_the_issue_s_database_url_is_refused_without_its_password(
    drip: Callable[..., Result],
) -> None:
    url = "postgresql:admin:s3cretPW@db.internal/drip"
    result = drip("deliveries", env={"DRIP_DATABASE_URL": url})
    assert result.exit_code == 1
    assert "DRIP_DATABASE_URL" in result.output and "s3cretPW" not in result.output


@pytest.mark.parametrize("password", PASSWORDS)
def test_db_upgrade_and_its_logs_show_no_password(
    password: str,
    postgres_url: str,
    drip: Callable[..., Result],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL here trusts every local user, so the URL works whatever its password."""
    caplog.set_level(logging.DEBUG)
    url = make_url(postgres_url).set(password=password).render_as_string(hide_password=False)
    for args in (["db", "upgrade"], ["deliveries"]):
        result = drip(*args, env={"DRIP_DATABASE_URL": url})
        assert result.exit_code == 0, result.output
        assert_hidden(result.output, password)
    assert "is at revision" in drip("db", "upgrade", env={"DRIP_DATABASE_URL": url}).output
    assert_hidden(caplog.text, password)


def test_an_unreachable_database_s_error_shows_no_password(
    drip: Callable[..., Result], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = "postgresql://admin:s3cretPW@127.0.0.1:1/drip"
    result = drip("deliveries", env={"DRIP_DATABASE_URL": url})
    assert result.exit_code == 1
    assert "s3cretPW" not in result.output + caplog.text


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_password_typed_unencoded_into_a_database_url_never_shows(
    password: str, postgres_url: str, drip: Callable[..., Result]
) -> None:
    """An '@' in it once made the driver look up a host named after the rest of the password."""
    parts = make_url(postgres_url)
    url = f"postgresql://{parts.username}:{password}@{parts.host}:{parts.port}/{parts.database}"
    result = drip("deliveries", env={"DRIP_DATABASE_URL": url})
    assert_hidden(result.output, password)
    assert result.exit_code == 0 or "DRIP_DATABASE_URL" in result.output, result.output
