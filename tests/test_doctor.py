"""`drip doctor`: each broken thing named on its own line with its fix, exit 1; warnings alone
exit 0; the SMTP probe speaks to real servers (EHLO, STARTTLS, AUTH) and sends nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result

from drip import doctor
from drip.doctor import Check, Context, Problem, SmtpProbe
from drip.settings import Settings
from drip.transports import SMTPTransport, open_transport
from tests.conftest import NOW, TEST_SECRET
from tests.smtp_servers import CapturingServer, closed_port, self_signed_tls
from tests.test_pipeline import (  # noqa: F401 - fixtures
    Pipeline,
    enrol_csv,
    pipeline,
    redis_url,  # noqa: F401 - the session's private redis-server
)

Drip = Callable[..., Result]
SHAPE = {"id", "check", "ok", "severity", "problem", "fix"}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """var/ (the generated key, the private Redis) is under the test's folder."""
    monkeypatch.chdir(tmp_path)


def findings(result: Result) -> dict[str, dict[str, object]]:
    listed = json.loads(result.stdout)
    assert all(set(entry) == SHAPE for entry in listed)
    return {str(entry["id"]): entry for entry in listed}


def run_doctor(drip: Drip, **env: str) -> tuple[Result, dict[str, dict[str, object]]]:
    result = drip("doctor", "--json", env=env)
    return result, findings(result)


def test_doctor_names_a_database_that_is_down(drip: Drip) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/drip"
    result, found = run_doctor(drip, DRIP_DATABASE_URL=url)
    assert result.exit_code == 1
    problem = found["database.unreachable"]
    assert "Connection refused" in str(problem["problem"])
    assert problem["fix"] == "start the database server, or correct DRIP_DATABASE_URL"
    assert found["migrations"]["severity"] == "skipped"  # one broken thing, one problem


def test_doctor_names_a_redis_that_is_down(drip: Drip) -> None:
    port = closed_port()
    result, found = run_doctor(drip, DRIP_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    assert result.exit_code == 1
    assert f"Redis unreachable at redis://127.0.0.1:{port}/0" in str(
        found["broker.unreachable"]["problem"]
    )
    assert found["workers"]["severity"] == found["ticker"]["severity"] == "skipped"


def test_doctor_names_an_smtp_server_that_refuses_connections(drip: Drip) -> None:
    port = closed_port()
    result, found = run_doctor(drip, DRIP_MAIL_URL=f"smtp://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert f"127.0.0.1:{port}" in str(found["mail.unreachable"]["problem"])


def test_doctor_names_a_server_without_starttls_under_tls_required(drip: Drip) -> None:
    with CapturingServer() as server:
        url = f"smtp://127.0.0.1:{server.port}?tls=required"
        result, found = run_doctor(drip, DRIP_MAIL_URL=url)
        assert result.exit_code == 1
        assert "does not offer STARTTLS" in str(found["mail.starttls-missing"]["problem"])
        assert server.messages == []


def test_doctor_names_an_unset_secret_key(drip: Drip) -> None:
    result, found = run_doctor(drip, DRIP_SECRET_KEY="")
    assert result.exit_code == 1
    problem = found["secret-key.generated"]
    assert "DRIP_SECRET_KEY is not set" in str(problem["problem"])
    assert "the same on every host" in str(problem["fix"])
    assert "secret-key.generated" not in findings(drip("doctor", "--json"))


def test_each_problem_is_one_line_with_its_fix(drip: Drip) -> None:
    port = closed_port()
    result = drip("doctor", env={"DRIP_MAIL_URL": f"smtp://127.0.0.1:{port}"})
    assert result.exit_code == 1
    (line,) = [line for line in result.stdout.splitlines() if "mail.unreachable" in line]
    assert line.startswith("error") and "— fix: check DRIP_MAIL_URL's host and port" in line
    assert "problem" in result.stderr and "run `drip doctor` again" in result.stderr


def test_checks_run_in_order_skip_what_depends_on_a_failure_and_warnings_do_not_fail(
    settings: Settings,
) -> None:
    checks = [
        Check("first", lambda ctx: [Problem("first.down", "it is down", "start it")], ()),
        Check("second", lambda ctx: [], ("first",)),
        Check("third", lambda ctx: [Problem("third.odd", "odd", "look", doctor.WARNING)], ()),
        Check("fourth", lambda ctx: [], ()),
    ]
    results = doctor.run(Context(settings, NOW), checks)
    assert [(r.id, r.severity) for r in results] == [
        ("first.down", "error"), ("second", "skipped"), ("third.odd", "warning"), ("fourth", "ok"),
    ]  # fmt: skip
    assert doctor.summary(results) == "1 problem, 1 warning"
    assert doctor.summary(results[2:]) == "0 problems, 1 warning"


# --- the SMTP probe against real servers -------------------------------------------------------


def probe(url: str, context: object = None) -> tuple[list[Problem], Context]:
    transport = open_transport(url)
    assert isinstance(transport, SMTPTransport)
    ctx = Context(Settings(mail_url=url), NOW)
    return list(SmtpProbe(url, transport, context).run(ctx)), ctx  # type: ignore[arg-type]


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[CapturingServer, object, Path]]:
    pytest.importorskip("cryptography")
    server_context, client_context = self_signed_tls(tmp_path)
    with CapturingServer(tls_context=server_context, credentials=("drip", "right")) as server:
        yield server, client_context, tmp_path / "cert.pem"


def test_the_probe_does_starttls_and_auth_and_sends_nothing(
    tls_server: tuple[CapturingServer, object, Path],
) -> None:
    server, client_context, _ = tls_server
    problems, ctx = probe(f"smtp://drip:right@127.0.0.1:{server.port}?tls=required", client_context)
    assert problems == []
    assert ctx.notes["mail"].endswith("EHLO, STARTTLS, AUTH; no message sent")
    assert server.logins == ["drip"] and server.messages == []


Served = tuple[CapturingServer, object, Path]


def test_the_probe_names_a_refused_password(tls_server: Served) -> None:
    server, client_context, _ = tls_server
    problems, _ = probe(f"smtp://drip:wrong@127.0.0.1:{server.port}", client_context)
    assert [p.id for p in problems] == ["mail.auth-refused"]
    assert "wrong" not in problems[0].problem  # never the password


def test_the_probe_names_a_certificate_it_cannot_trust(
    tls_server: tuple[CapturingServer, object, Path],
) -> None:
    server, _, _ = tls_server
    problems, _ = probe(f"smtp://drip:right@127.0.0.1:{server.port}")  # the system's CAs
    assert [p.id for p in problems] == ["mail.tls-certificate"]
    assert "?cafile=" in problems[0].fix


def test_the_probe_never_sends_a_password_unencrypted() -> None:
    with CapturingServer() as server:
        problems, _ = probe(f"smtp://drip:right@127.0.0.1:{server.port}")
    assert [p.id for p in problems] == ["mail.auth-unencrypted"]


def test_a_file_outbox_must_be_writable(tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "not-a-folder").write_text("x")
    url = f"file://{tmp_path / 'not-a-folder' / 'outbox'}"
    ctx = Context(Settings(mail_url=url), NOW)
    assert [p.id for p in doctor.mail_reachable(ctx)] == ["mail.outbox"]
    fine = Context(Settings(mail_url=f"file://{tmp_path / 'new' / 'outbox'}"), NOW)
    assert list(doctor.mail_reachable(fine)) == []


@pytest.mark.parametrize(
    ("public_url", "mail_url", "expected"),
    [
        ("https://drip.clinic.example", "smtp://relay.example:587", []),
        ("http://drip.example", "smtp://relay.example:587", [("public-url.http", "warning")]),
        ("http://127.0.0.1:8025", "smtp://relay.example:587", [("public-url.loopback", "error")]),
        ("http://127.0.0.1:8025", "file://var/outbox", []),
    ],
)
def test_the_public_url_must_be_https_and_reachable_by_patients(
    public_url: str, mail_url: str, expected: list[tuple[str, str]]
) -> None:
    ctx = Context(Settings(public_url=public_url, mail_url=mail_url), NOW)
    assert [(p.id, p.severity) for p in doctor.public_url_https(ctx)] == expected


@pytest.mark.parametrize(
    ("window", "expected"),
    [("09:00-19:00", []), ("06:00-19:00", ["send-window.night"]),
     ("00:00-24:00", ["send-window.night"]), ("10:00-12:00", ["send-window.short"])],
)  # fmt: skip
def test_a_send_window_at_night_or_too_short_is_a_warning(window: str, expected: list[str]) -> None:
    from drip.planning import SendWindow

    ctx = Context(Settings(send_window=SendWindow.parse(window)), NOW)
    found = list(doctor.send_window_sane(ctx))
    assert [p.id for p in found] == expected and all(p.severity == "warning" for p in found)


def test_a_broken_campaign_is_named_with_the_linter_s_finding(
    tmp_path: Path, settings: Settings
) -> None:
    import shutil

    from drip.paths import TEMPLATES

    shutil.copytree(TEMPLATES, tmp_path / "emails")
    (tmp_path / "emails" / "ketamine-onboarding" / "welcome.txt.j2").unlink()
    ctx = Context(Settings(templates_dir=tmp_path / "emails"), NOW)
    found = list(doctor.campaigns_lint_clean(ctx))
    assert [p.id for p in found] == ["campaigns.missing-part"]
    assert "welcome" in found[0].problem


def test_a_patient_zone_this_host_does_not_know_is_named(
    drip: Drip, settings: Settings, engine: object
) -> None:
    from sqlalchemy import update

    from drip.models import Patient

    drip("enroll", "ana@example.com", "--campaign", "ketamine-onboarding", "--first-name", "A")
    with engine.begin() as c:  # type: ignore[attr-defined]
        c.execute(update(Patient).values(timezone="Mars/Olympus_Mons"))
    ctx = Context(settings, NOW)
    try:
        found = list(doctor.patient_zones_known(ctx))
    finally:
        ctx.close()
    assert [p.id for p in found] == ["zones.unknown"] and "1 patient" in found[0].problem


def test_loose_permissions_are_problems_with_the_chmod_that_fixes_them(tmp_path: Path) -> None:
    var = tmp_path / "var"
    var.mkdir(mode=0o755)
    var.chmod(0o755)
    ctx = Context(Settings(var_dir=var, mail_url="smtp://relay.example"), NOW)
    (found,) = doctor.private_files(ctx)
    assert found.id == "permissions.loose" and found.fix == f"chmod 700 {var}"


def test_the_probe_trusts_the_ca_that_the_url_s_cafile_names(tls_server: Served) -> None:
    """?cafile= (DRIP_MAIL_URL) names a private CA: the probe verifies the server with it."""
    server, _, cafile = tls_server
    url = f"smtp://drip:right@127.0.0.1:{server.port}?tls=required&cafile={cafile}"
    transport = open_transport(url)
    assert isinstance(transport, SMTPTransport)
    ctx = Context(Settings(), NOW)
    assert list(SmtpProbe(url, transport).run(ctx)) == []
    assert "STARTTLS, AUTH" in ctx.notes["mail"]



@pytest.mark.parametrize("offers_starttls", [True, False])
def test_under_tls_none_the_probe_does_what_the_transport_does_no_starttls_and_auth_in_clear(
    tmp_path: Path, offers_starttls: bool
) -> None:
    """A relay on this host with a certificate nobody trusts, used with ?tls=none (no TLS, the
    password in plain text, by the operator's choice): the transport sends; the probe must not
    say otherwise, nor try a STARTTLS the transport never would."""
    pytest.importorskip("cryptography")
    server_context, _ = self_signed_tls(tmp_path)
    with CapturingServer(
        tls_context=server_context if offers_starttls else None,
        credentials=("drip", "right"),
        auth_over_plain_text=True,
    ) as server:
        url = f"smtp://drip:right@127.0.0.1:{server.port}?tls=none"
        with open_transport(url) as transport:
            transport.send("clinic@example.com", "ana@example.com", b"Subject: x\r\n\r\nhi\r\n")
        server.wait_for(1)
        problems, ctx = probe(url)
        verbs = [verb for verb, _ in server.commands]
    assert [p.id for p in problems if p.severity == "error"] == []
    assert "STARTTLS" not in verbs and server.logins == ["drip", "drip"]
    assert "AUTH" in ctx.notes["mail"]


def test_the_probe_loads_the_cafile_as_drip_mail_url_does_a_home_folder_included(
    tls_server: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _, cafile = tls_server
    monkeypatch.setenv("HOME", str(cafile.parent))
    problems, ctx = probe(f"smtp://drip:right@127.0.0.1:{server.port}?tls=required&cafile=~/cert.pem")
    assert problems == []
    assert "STARTTLS, AUTH" in ctx.notes["mail"]


@pytest.mark.slow
def test_a_healthy_set_up_is_exit_0_and_its_warnings_do_not_fail_it(
    drip: Drip, pipeline: Pipeline  # noqa: F811
) -> None:
    """A real worker and ticker, Redis, an SMTP server on loopback; one warning (a send window
    that reaches into the night) is said, and is not a failure."""
    enrol_csv(drip, pipeline, ["ana@example.com,Ana,America/New_York,"])
    pipeline.worker("w1")
    pipeline.beat()
    pipeline.wait_settled()
    env = pipeline.env | {
        "DRIP_PUBLIC_URL": "https://drip.clinic.example",
        "DRIP_SEND_WINDOW": "06:00-22:00",
    }
    command = [sys.executable, "-m", "drip", "doctor", "--json"]
    done = subprocess.run(command, env=env, cwd=pipeline.root, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    found = {entry["id"]: entry for entry in json.loads(done.stdout)}
    assert {i for i, e in found.items() if not e["ok"]} == {"send-window.night"}
    assert found["send-window.night"]["severity"] == "warning"
    for check in ("database", "migrations", "broker", "workers", "ticker", "mail", "campaigns"):
        assert found[check]["ok"], found
    human = subprocess.run(command[:-1], env=env, cwd=pipeline.root, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert human.returncode == 0 and "0 problems, 1 warning" in human.stdout
    assert "ok       workers: 1 alive: w1@" in human.stdout


def test_doctor_names_suppressions_made_under_a_key_dropped_from_drip_secret_key(
    drip: Drip,
) -> None:
    """Dropping an old key silently lifts every suppression it made (the list holds hashes,
    never addresses): doctor says so, and putting the key back at the end clears it."""
    assert drip("suppress", "eve@example.com", "--reason", "manual").exit_code == 0
    new_key = "a-brand-new-key-0123456789abcdefghijklmnop"
    result, found = run_doctor(drip, DRIP_SECRET_KEY=new_key)
    assert result.exit_code == 1
    assert "1 suppression entry" in str(found["suppressions.key-missing"]["problem"])
    _, found = run_doctor(drip, DRIP_SECRET_KEY=f"{new_key},{TEST_SECRET}")
    assert found["suppressions"]["severity"] == "ok"
