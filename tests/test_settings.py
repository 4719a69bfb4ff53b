from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from drip.errors import ConfigError
from drip.settings import Settings
from tests.conftest import TEST_SECRET


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
        "DRIP_MAIL_URL": "smtps://u:p@mail.example:465?timeout=10",
        "DRIP_SECRET_KEY": TEST_SECRET,
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
    assert s.mail_url == env["DRIP_MAIL_URL"] and s.secret_key == TEST_SECRET
    assert s.mail_timeout == 10
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
        ("DRIP_MAIL_URL", "smtp://mail.example?cafile=/no/such/ca.pem", "cafile="),
        ("DRIP_MAIL_URL", "smtps://mail.example?tls=none", "use smtp://"),
        ("DRIP_PUBLIC_URL", "drip.example", "http/https"),
        ("DRIP_PUBLIC_URL", "https://drip.example/un subscribe", "without spaces"),
        ("DRIP_PUBLIC_URL", "https://klinik-bücher.example", "xn--"),
        # the link is DRIP_PUBLIC_URL + /unsubscribe/<token>: after a ? or # no token reaches
        # drip serve, and a > ends List-Unsubscribe's <…>
        ("DRIP_PUBLIC_URL", "https://drip.example/?clinic=1", "no ? or #"),
        ("DRIP_PUBLIC_URL", "https://drip.example/#top", "no ? or #"),
        ("DRIP_PUBLIC_URL", "https://drip.example/a>,<https://evil.example", "no ? or #"),
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
        ("DRIP_MIN_GAP", "twelve hours", "12h"),
        ("DRIP_MIN_GAP", "30d", "out of range; use 0 to 7d"),
        ("DRIP_RETRY_FOR", "forever", "3d"),
        ("DRIP_RETRY_FOR", "0d", "out of range; use 1m to 30d"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_fix(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value, "DRIP_SECRET_KEY": TEST_SECRET})
    assert name in str(caught.value) and message in str(caught.value)


def test_a_bad_broker_url_does_not_print_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(
            {"DRIP_BROKER_URL": "amqp://user:hunter2@rabbit", "DRIP_SECRET_KEY": TEST_SECRET}
        )
    assert "hunter2" not in str(caught.value)


def test_drip_now_starts_the_clock_there_and_lets_it_run() -> None:
    start, before = datetime(2026, 3, 29, 0, 30, tzinfo=UTC), datetime.now(UTC)
    env = {"DRIP_NOW": "2026-03-29T00:30:00Z", "DRIP_SECRET_KEY": TEST_SECRET}
    clock = Settings.from_env(env).clock()
    first = clock.now()
    assert start <= first <= start + (datetime.now(UTC) - before)  # run on by real time only
    assert clock.now() >= first


def test_without_drip_now_the_clock_is_real() -> None:
    before = datetime.now(UTC)
    now = Settings.from_env({"DRIP_SECRET_KEY": TEST_SECRET}).clock().now()
    assert before <= now <= datetime.now(UTC)


def test_gap_and_retry_age_have_defaults_and_take_durations() -> None:
    default = Settings.from_env({"DRIP_SECRET_KEY": TEST_SECRET})
    assert default.min_gap == timedelta(hours=12) and default.retry_for == timedelta(days=3)
    env = {"DRIP_MIN_GAP": "1d", "DRIP_RETRY_FOR": "5d", "DRIP_SECRET_KEY": TEST_SECRET}
    s = Settings.from_env(env)
    assert s.min_gap == timedelta(days=1) and s.retry_for == timedelta(days=5)
    no_gap = Settings.from_env({"DRIP_MIN_GAP": "0", "DRIP_SECRET_KEY": TEST_SECRET})
    assert no_gap.min_gap == timedelta(0)


def test_a_lease_too_short_for_the_mail_timeout_is_refused_at_start_up() -> None:
    """A row marked `sending` must hold its lease for the longest send the timeout allows, or
    a slow relay turns sends `unknown`."""
    env = {"DRIP_MAIL_URL": "smtp://mail.example:587", "DRIP_SECRET_KEY": TEST_SECRET}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env | {"DRIP_LEASE_SECONDS": "60"})
    message = str(caught.value)
    assert "DRIP_LEASE_SECONDS=60" in message and "timeout of 30 s" in message
    assert "at least 122" in message
    ok = Settings.from_env(
        env | {"DRIP_LEASE_SECONDS": "60", "DRIP_MAIL_URL": env["DRIP_MAIL_URL"] + "?timeout=10"}
    )
    assert ok.slowest_send_seconds == 21 and ok.soft_deadline_seconds == 39
    assert Settings.from_env(env).soft_deadline_seconds == 300 - 61  # the defaults fit


KEY_A = "first-key-signs-0123456789abcdefghij"
KEY_B = "second-key-verifies-0123456789abcdefg"


@pytest.mark.parametrize(
    "value",
    ["k", "x" * 31, "é" * 15 + "x", f"{KEY_A},tiny", f"{KEY_A},", f"{KEY_A}, ,{KEY_B}"],
)
def test_a_secret_key_shorter_than_32_bytes_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DRIP_SECRET_KEY": value})
    message = str(caught.value)
    assert "DRIP_SECRET_KEY" in message and "32 bytes" in message
    assert "secrets.token_urlsafe(32)" in message
    assert "tiny" not in message  # a key is never echoed


def test_several_secret_keys_the_first_signs_all_verify() -> None:
    from drip.unsubscribe import make_token, read_token

    settings = Settings.from_env({"DRIP_SECRET_KEY": f"{KEY_A}, {KEY_B}"})
    assert settings.secret_key == KEY_A and settings.secret_keys == (KEY_A, KEY_B)
    public_id = "AAAAAAAAAAAAAAAAAAAAAA"  # 22 characters, as drip.patients.new_public_id makes
    assert read_token(settings.secret_keys, make_token(KEY_B, public_id)) == public_id
    assert read_token(settings.secret_keys, make_token(KEY_A, public_id)) == public_id
    assert Settings.from_env({"DRIP_SECRET_KEY": "é" * 16}).secret_keys == ("é" * 16,)


def test_settings_made_in_code_verify_with_their_one_key() -> None:
    assert Settings(secret_key=KEY_A).secret_keys == (KEY_A,)


@pytest.mark.parametrize("content", ["", "  \n"])
def test_an_empty_stored_key_is_an_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "secret_key").write_text(content)
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({})
    assert "var/secret_key" in str(caught.value) and "DRIP_SECRET_KEY" in str(caught.value)


def test_processes_and_threads_starting_at_once_get_the_same_stored_key(tmp_path: Path) -> None:
    """Racers (processes and threads) are held at a gate, then all read or make var/secret_key."""
    import subprocess
    import sys
    import threading
    import time

    from drip.settings import stored_secret

    racer = (
        "import pathlib, sys, time\n"
        "from drip.settings import stored_secret\n"
        "ready, go, var = map(pathlib.Path, sys.argv[1:])\n"
        "ready.touch()\n"
        "while not go.exists(): time.sleep(0.0005)\n"
        "print(stored_secret(var))\n"
    )
    for attempt in range(2):
        var, go = tmp_path / f"var{attempt}", tmp_path / f"go{attempt}"
        ready = [tmp_path / f"ready{attempt}-{i}" for i in range(4)]
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", racer, str(r), str(go), str(var)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for r in ready
        ]
        keys: set[str] = set()
        gate = threading.Barrier(9)

        def race(var: Path = var, gate: threading.Barrier = gate, keys: set[str] = keys) -> None:
            gate.wait()
            keys.add(stored_secret(var))

        threads = [threading.Thread(target=race) for _ in range(8)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline, "the racing processes did not start"
            time.sleep(0.01)
        go.touch()
        gate.wait()
        for thread in threads:
            thread.join()
        for process in processes:
            out, _ = process.communicate(timeout=60)
            assert process.returncode == 0
            keys.add(out.strip())
        assert len(keys) == 1 and len(keys.pop()) >= 32
        assert [p.name for p in var.iterdir()] == ["secret_key"]


@pytest.mark.parametrize(
    "url",
    [
        "postgres://drip:pw@db.example/drip",
        "postgresql://drip@db.example/drip",
        "postgresql+psycopg://drip@db.example/drip",
    ],
)
def test_postgres_urls_of_every_spelling_are_accepted(url: str) -> None:
    assert Settings.from_env({"DRIP_DATABASE_URL": url}).database_url == url


@pytest.mark.postgres
def test_a_postgres_url_reaches_the_database(postgres_url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from drip.db import make_engine

    url = make_url(postgres_url).set(drivername="postgres").render_as_string(hide_password=False)
    engine = make_engine(Settings.from_env({"DRIP_DATABASE_URL": url}).database_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar() == 1
    engine.dispose()


def test_postgres_with_a_driver_of_its_own_is_refused() -> None:
    with pytest.raises(ConfigError, match="DRIP_DATABASE_URL"):
        Settings.from_env({"DRIP_DATABASE_URL": "postgres+psycopg://db.example/drip"})


@pytest.mark.parametrize(
    "value",
    [
        "Lakeside Wellness, LLC <care@lakeside.example>",
        '"Lakeside Wellness, LLC" <care@lakeside.example>',
        "Zoë's Clinic <care@clinic.example>",
    ],
)
def test_drip_from_with_a_comma_or_quotes_is_accepted(value: str) -> None:
    assert Settings.from_env({"DRIP_FROM": value}).from_address == value


@pytest.mark.parametrize(
    "value",
    [
        "care@clinic.example",
        "Clinic",
        "Clinic <not an address>",
        "A <a@x.example>, B <b@x.example>",
        "Clinic <care@clinic.example> trailing",
    ],
)
def test_drip_from_without_one_display_name_and_address_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="DRIP_FROM"):
        Settings.from_env({"DRIP_FROM": value})


@pytest.mark.parametrize(
    ("value", "word"),
    [
        ("Lakeside Ketamine Clinic <care@lakeside.example>", "ketamine"),
        ("Springfield Infusion Center <care@springfield.example>", "infusion"),
        ("Mental-Health Partners, LLC <hello@partners.example>", "mental health"),
    ],
)
def test_drip_from_naming_a_sensitive_word_is_refused(value: str, word: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DRIP_FROM": value})
    assert "DRIP_FROM" in str(caught.value) and repr(word) in str(caught.value)


@pytest.mark.parametrize(
    "value", ["localtime", "Factory", "posixrules", "posix/Asia/Tokyo", "right/America/New_York"]
)
def test_a_clinic_zone_that_is_a_zone_file_but_no_iana_zone_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DRIP_CLINIC_TIMEZONE": value, "DRIP_SECRET_KEY": TEST_SECRET})
    assert "DRIP_CLINIC_TIMEZONE" in str(caught.value) and "Area/City" in str(caught.value)


def test_a_clinic_zone_may_be_a_legacy_iana_name() -> None:
    env = {"DRIP_CLINIC_TIMEZONE": "US/Eastern", "DRIP_SECRET_KEY": TEST_SECRET}
    settings = Settings.from_env(env)
    assert settings.clinic_timezone == "US/Eastern"


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("Clinic <care@клиника.example>", "Clinic <care@xn--80apagcdp.example>"),
        ('"Lakeside, LLC" <care@Bücher.example>', '"Lakeside, LLC" <care@xn--bcher-kva.example>'),
    ],
)
def test_drip_from_with_an_international_domain_is_kept_in_its_xn_form(
    value: str, stored: str
) -> None:
    assert Settings.from_env({"DRIP_FROM": value}).from_address == stored


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("Clinic <кира@clinic.example>", "ASCII"),
        ("Clinic\r\n <care@clinic.example>", "U+000D"),
        ("Clinic <care@clinic.example\r\n>", "U+000D"),
        ("Clinic\x00 <care@clinic.example>", "U+0000"),
        ("Clinic\t<care@clinic.example>", "U+0009"),
        ("Clinic\u202e <care@clinic.example>", "U+202E"),
        ("Clinic <care@clinic.example>\nBcc: x@y.example", "U+000A"),
        ("Clinic <care@clinic.example>\n", "U+000A (LINE FEED)"),
        ("Clinic\r\nBcc: a@evil.example <care@clinic.example>", "U+000D (CARRIAGE RETURN)"),
        ("Clinic\u2028Bcc: a@evil.example <care@clinic.example>", "U+2028"),
        ("Clinic\x85 <care@clinic.example>", "U+0085 (NEXT LINE)"),
        ("=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?= <care@clinic.example>", "encoded word"),
        ("=?utf-8?q?Clinic=0D=0ABcc:_a@evil.example?= <care@clinic.example>", "encoded word"),
        ("a@x.example, b@y.example", "one address"),
        ('"A" <a@x.example>, <b@y.example>', "one address"),
        ("A <a@x.example>, B <b@x.example>", "one address"),
        ("Clinic <a@x.example, b@y.example>", "one address"),
        ("Clinic <a@x.example>, b@y.example", "one address"),
    ],
)
def test_drip_from_with_a_line_break_or_two_addresses_is_refused(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DRIP_FROM": value})
    message = str(caught.value)
    assert message.startswith("DRIP_FROM") and says in message
    assert "\r" not in message and "\n" not in message and "\x00" not in message


@pytest.mark.parametrize(
    "instant",
    ["9999-12-31T23:59:59", "0001-01-01T00:00:00", "9999-12-31T23:00:00-05:00", "1999-12-31"],
)
def test_drip_now_outside_2000_to_2100_is_refused_at_start_up(tmp_path: Path, instant: str) -> None:
    """A calendar at year 9999 overflows the first date planned after it (OverflowError)."""
    clock_file = tmp_path / "now"
    clock_file.write_text(instant)
    for name, value in (("DRIP_NOW", instant), ("DRIP_NOW_FILE", str(clock_file))):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({name: value, "DRIP_SECRET_KEY": TEST_SECRET})
        assert name in str(caught.value) and "2000-01-01 to 2100-01-01" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+nope://drip:s3cretPW@db.example/drip",
        "postgresql+psycopg2://drip:s3cretPW@db.example/drip",
        "sqlite+nope:///var/drip.db",
    ],
)
def test_a_database_driver_drip_does_not_support_is_refused_without_the_password(
    url: str,
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DRIP_DATABASE_URL": url, "DRIP_SECRET_KEY": TEST_SECRET})
    said = str(caught.value)
    assert "DRIP_DATABASE_URL" in said and "postgresql+psycopg" in said and "sqlite" in said
    assert "s3cretPW" not in said


def test_sqlite_with_its_own_driver_name_is_accepted() -> None:
    url = "sqlite+pysqlite:///var/drip.db"
    assert Settings.from_env({"DRIP_DATABASE_URL": url}).database_url == url
