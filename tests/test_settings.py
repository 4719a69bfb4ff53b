from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from drip.errors import ConfigError
from drip.settings import Settings


def test_defaults_are_the_embedded_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    assert settings.database_url == "sqlite:///var/drip.db"
    assert settings.uses_embedded_broker
    assert settings.mail_url == "file://var/outbox"
    assert str(settings.send_window) == "09:00-19:00"
    assert settings.lease_seconds == 300 and settings.batch_size == 100
    assert settings.tick_seconds == 5.0 and settings.clinic_timezone == "America/New_York"
    assert "(demo" in settings.clinic_name


def test_the_secret_key_is_generated_once_into_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = Settings.from_env({}).secret_key
    assert len(first) >= 32
    assert Settings.from_env({}).secret_key == first
    assert (tmp_path / "var" / "secret_key").stat().st_mode & 0o077 == 0


def test_every_variable_is_read() -> None:
    env = {
        "DRIP_DATABASE_URL": "postgresql://drip@db/drip",
        "DRIP_BROKER_URL": "redis://redis:6379/0",
        "DRIP_MAIL_URL": "smtps://u:p@mail.example:465",
        "DRIP_SECRET_KEY": "k",
        "DRIP_PUBLIC_URL": "https://drip.example/",
        "DRIP_FROM": "Clinic <care@clinic.example>",
        "DRIP_SEND_WINDOW": "08:00-20:00",
        "DRIP_NOW": "2026-11-01T09:00:00-05:00",
        "DRIP_LEASE_SECONDS": "60",
        "DRIP_TEMPLATES_DIR": "/srv/campaigns",
        "DRIP_CLINIC_NAME": "Clinic",
        "DRIP_CLINIC_ADDRESS": "1 Road",
        "DRIP_CLINIC_PHONE": "555",
        "DRIP_CLINIC_TIMEZONE": "Europe/London",
        "DRIP_TICK_SECONDS": "2.5",
        "DRIP_BATCH_SIZE": "50",
    }
    s = Settings.from_env(env)
    assert s.database_url == env["DRIP_DATABASE_URL"] and s.broker_url == env["DRIP_BROKER_URL"]
    assert s.mail_url == env["DRIP_MAIL_URL"] and s.secret_key == "k"
    assert s.public_url == "https://drip.example"
    assert s.from_address == env["DRIP_FROM"] and str(s.send_window) == "08:00-20:00"
    assert s.now == datetime(2026, 11, 1, 14, 0, tzinfo=UTC)
    assert s.lease_seconds == 60 and s.templates_dir == Path("/srv/campaigns")
    assert (s.clinic_name, s.clinic_address, s.clinic_phone) == ("Clinic", "1 Road", "555")
    assert s.clinic_timezone == "Europe/London" and s.tick_seconds == 2.5 and s.batch_size == 50
    assert not s.uses_embedded_broker


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DRIP_DATABASE_URL", "mysql://x/y", "sqlite/postgresql"),
        ("DRIP_BROKER_URL", "amqp://guest@rabbit", "redis"),
        ("DRIP_BROKER_URL", "redis://:6379", "no host"),
        ("DRIP_MAIL_URL", "smtp://mail.example:port", "bad port"),
        ("DRIP_MAIL_URL", "sendmail", "smtp/smtps/file"),
        ("DRIP_MAIL_URL", "smtp://mail.example?tls=sometimes", "tls"),
        ("DRIP_PUBLIC_URL", "drip.example", "http/https"),
        ("DRIP_PUBLIC_URL", "https://drip.example/un subscribe", "without spaces"),
        ("DRIP_PUBLIC_URL", "https://klinik-bücher.example", "xn--"),
        ("DRIP_FROM", "care@clinic.example", "display name"),
        ("DRIP_SEND_WINDOW", "9-5", "09:00-19:00"),
        ("DRIP_SEND_WINDOW", "19:00-09:00", "end after it starts"),
        ("DRIP_NOW", "tomorrow", "ISO-8601"),
        ("DRIP_LEASE_SECONDS", "five", "whole number"),
        ("DRIP_LEASE_SECONDS", "1", "out of range"),
        ("DRIP_CLINIC_TIMEZONE", "EST5EDT/Nowhere", "IANA"),
        ("DRIP_TICK_SECONDS", "0", "out of range"),
        ("DRIP_BATCH_SIZE", "-3", "out of range"),
        ("DRIP_CLINIC_NAME", "two\nlines", "control character"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_fix(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value, "DRIP_SECRET_KEY": "k"})
    assert name in str(caught.value) and message in str(caught.value)


def test_a_bad_broker_url_does_not_print_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DRIP_BROKER_URL": "amqp://user:hunter2@rabbit", "DRIP_SECRET_KEY": "k"})
    assert "hunter2" not in str(caught.value)


def test_drip_now_starts_the_clock_there_and_lets_it_run() -> None:
    start, before = datetime(2026, 3, 29, 0, 30, tzinfo=UTC), datetime.now(UTC)
    clock = Settings.from_env({"DRIP_NOW": "2026-03-29T00:30:00Z", "DRIP_SECRET_KEY": "k"}).clock()
    first = clock.now()
    assert start <= first <= start + (datetime.now(UTC) - before)  # run on by real time only
    assert clock.now() >= first


def test_without_drip_now_the_clock_is_real() -> None:
    before = datetime.now(UTC)
    now = Settings.from_env({"DRIP_SECRET_KEY": "k"}).clock().now()
    assert before <= now <= datetime.now(UTC)
