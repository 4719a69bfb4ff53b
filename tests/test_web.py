"""`drip serve` over real HTTP on loopback: a gunicorn subprocess against real SQLite and
PostgreSQL databases (tests/serving.py). The unsubscribe page changes nothing; one-click and the
page's button unsubscribe, once; bad requests change nothing; every page carries the security
headers and valid HTML in the clinic's colours; no log line holds a token."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import html5lib
import pytest
from click.testing import Result
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select

from drip.models import Delivery, Enrolment, Event, Patient, Suppression
from drip.paths import WEB_TEMPLATES
from drip.server import TokenFilter
from drip.settings import Settings
from drip.tokens import make_token
from drip.web import create_app, hide_path, hide_tokens
from tests.conftest import TEST_SECRET
from tests.serving import Answer, Served, free_port, serving, start
from tests.smtp_servers import closed_port

pytestmark = pytest.mark.slow
ONE_CLICK = "List-Unsubscribe=One-Click"
HEADERS = {
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
PHONE = "+1 555 0100 (demo number)"  # Settings' default DRIP_CLINIC_PHONE


@pytest.fixture
def server(env: dict[str, str], tmp_path: Path) -> Iterator[Served]:
    with serving(env, tmp_path / "serve") as served:
        yield served


@pytest.fixture
def patient(drip: Callable[..., Result], engine: Engine) -> str:
    """An enrolled patient's unsubscribe path."""
    result = drip(
        "enroll", "ana@example.com", "--campaign", "ketamine-onboarding", "--first-name", "Ana"
    )
    assert result.exit_code == 0, result.output
    with engine.connect() as c:
        public_id = c.scalar(select(Patient.public_id))
    assert public_id
    return f"/unsubscribe/{make_token(TEST_SECRET, public_id)}"


def snapshot(engine: Engine) -> dict[str, Any]:
    """Everything an unsubscribe would change."""
    with engine.connect() as c:
        return {
            "unsubscribed": c.execute(select(Patient.id, Patient.unsubscribed_at)).all(),
            "enrolments": c.execute(select(Enrolment.id, Enrolment.status)).all(),
            "deliveries": c.execute(select(Delivery.id, Delivery.state)).all(),
            "suppressions": c.scalar(select(func.count()).select_from(Suppression)),
            "events": c.scalar(select(func.count()).select_from(Event)),
        }


def states(engine: Engine) -> set[str]:
    with engine.connect() as c:
        return set(c.scalars(select(Delivery.state)))


def unsubscribed_events(engine: Engine) -> list[str | None]:
    with engine.connect() as c:
        return list(c.scalars(select(Event.detail).where(Event.kind == "patient.unsubscribed")))


def assert_unsubscribed(engine: Engine) -> None:
    with engine.connect() as c:
        assert c.scalar(select(Patient.unsubscribed_at)) is not None
        assert set(c.scalars(select(Enrolment.status))) == {"ended"}
        assert c.scalar(select(func.count()).select_from(Suppression)) == 1
    assert states(engine) == {"skipped"}


# --- the page and the button ---------------------------------------------------------------------


def test_the_page_asks_with_one_button_and_opening_it_changes_nothing(
    server: Served, patient: str, engine: Engine
) -> None:
    before = snapshot(engine)
    for _ in range(3):  # a link scanner, then the patient, then their phone's preview
        page = server.get(patient)
        assert page.status == 200
        assert "Stop these emails?" in page.text and "Unsubscribe" in page.text
        assert "Lakeside Wellness Clinic (demo)" in page.text and PHONE in page.text
    assert server.request("HEAD", patient).status == 200
    assert snapshot(engine) == before
    assert "Ana" not in page.text and "ana@example.com" not in page.text


def test_a_one_click_post_unsubscribes_and_skips_every_unsent_email(
    server: Served, patient: str, engine: Engine
) -> None:
    assert states(engine) == {"scheduled"}
    done = server.post_form(patient, ONE_CLICK)
    assert done.status == 200, done.text
    assert "You are unsubscribed" in done.text
    assert "no other email will come to you from this list" in done.text
    assert PHONE in done.text and "Your appointments and your care stay the same" in done.text
    assert "Set-Cookie" not in done.headers and "Location" not in done.headers
    assert_unsubscribed(engine)
    assert [d and "source=one-click" in d for d in unsubscribed_events(engine)] == [True]


def test_a_multipart_one_click_post_unsubscribes_too(
    server: Served, patient: str, engine: Engine
) -> None:
    body = (
        '--b0undary\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
        "One-Click\r\n--b0undary--\r\n"
    )
    done = server.request(
        "POST", patient, body, {"Content-Type": "multipart/form-data; boundary=b0undary"}
    )
    assert done.status == 200, done.text
    assert_unsubscribed(engine)


class Forms(HTMLParser):
    """The forms of a page: their attributes and the fields a browser would submit."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "form":
            self.forms.append({"attrs": found, "fields": []})
        elif tag in ("input", "button") and self.forms and found.get("name"):
            self.forms[-1]["fields"].append((found["name"], found.get("value") or ""))


def test_the_pages_button_posts_the_same_field_to_the_same_address_and_unsubscribes(
    server: Served, patient: str, engine: Engine
) -> None:
    parser = Forms()
    parser.feed(server.get(patient).text)
    (form,) = parser.forms
    assert form["attrs"].get("method") == "post"
    assert "action" not in form["attrs"]  # a form without one posts to the page's own address
    assert ("List-Unsubscribe", "One-Click") in form["fields"]
    body = "&".join(f"{name}={value}" for name, value in form["fields"])
    done = server.post_form(patient, body)
    assert done.status == 200, done.text
    assert_unsubscribed(engine)
    assert [d and "source=page" in d for d in unsubscribed_events(engine)] == [True]
    assert "You are already unsubscribed" in server.get(patient).text


def test_a_second_post_is_a_harmless_no_op(server: Served, patient: str, engine: Engine) -> None:
    assert server.post_form(patient, ONE_CLICK).status == 200
    after_first = snapshot(engine)
    again = server.post_form(patient, ONE_CLICK)
    assert again.status == 200 and "You are unsubscribed" in again.text
    assert snapshot(engine) == after_first


def test_a_patient_a_coordinator_suppressed_can_still_press_the_button(
    server: Served, patient: str, engine: Engine, drip: Callable[..., Result]
) -> None:
    assert drip("suppress", "ana@example.com").exit_code == 0
    done = server.post_form(patient, ONE_CLICK)
    assert done.status == 200 and "You are unsubscribed" in done.text
    assert_unsubscribed(engine)


def test_two_posts_at_once_both_answer_200_and_unsubscribe_once(
    server: Served, patient: str, engine: Engine
) -> None:
    start_together = threading.Barrier(2)
    answers: list[Answer] = []

    def post() -> None:
        start_together.wait()
        answers.append(server.post_form(patient, ONE_CLICK))

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status for a in answers] == [200, 200], [a.text for a in answers]
    assert all("You are unsubscribed" in a.text for a in answers)
    assert len(unsubscribed_events(engine)) == 1
    assert_unsubscribed(engine)


# --- bad requests change nothing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("", "application/x-www-form-urlencoded"),
        ("List-Unsubscribe=Yes", "application/x-www-form-urlencoded"),
        ("list-unsubscribe=one-click", "application/x-www-form-urlencoded"),
        ("Unsubscribe=One-Click", "application/x-www-form-urlencoded"),
        (ONE_CLICK, "text/plain"),
        ('{"List-Unsubscribe": "One-Click"}', "application/json"),
        (ONE_CLICK, None),
    ],
)
def test_a_post_with_another_body_is_400_says_why_and_changes_nothing(
    server: Served, patient: str, engine: Engine, body: str, content_type: str | None
) -> None:
    before = snapshot(engine)
    headers = {"Content-Type": content_type} if content_type else {}
    refused = server.request("POST", patient, body, headers)
    assert refused.status == 400
    assert "List-Unsubscribe=One-Click" in refused.text and "Nothing was changed" in refused.text
    assert snapshot(engine) == before


def test_a_get_with_a_body_is_400_and_changes_nothing(
    server: Served, patient: str, engine: Engine
) -> None:
    before = snapshot(engine)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    refused = server.request("GET", patient, ONE_CLICK, form)
    assert refused.status == 400 and "must not carry a body" in refused.text
    assert snapshot(engine) == before


def tampered(path: str) -> list[str]:
    token = path.rsplit("/", 1)[1]
    public_id, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    stranger = make_token(TEST_SECRET, "Q" * 22)  # well signed, but nobody has that public id
    forged = make_token("another-key-entirely-0123456789abcdef", public_id)
    return [
        f"{public_id}.{flipped}", token[:-1], token[:30], public_id, f"{token}x", stranger, forged,
        token.upper(), "%00", "..%2f..%2fetc%2fpasswd",
    ]  # fmt: skip


def test_a_tampered_truncated_or_unknown_token_is_404_and_changes_nothing(
    server: Served, patient: str, engine: Engine
) -> None:
    before = snapshot(engine)
    for token in tampered(patient):
        for answer in (server.get(f"/unsubscribe/{token}"),
                       server.post_form(f"/unsubscribe/{token}", ONE_CLICK)):  # fmt: skip
            assert answer.status == 404, (token, answer.status)
            assert "This link does not work" in answer.text or "Page not found" in answer.text
            assert token not in answer.text
    assert snapshot(engine) == before


def test_unknown_paths_are_404_and_other_methods_405(server: Served, patient: str) -> None:
    for path in ("/", "/unsubscribe", "/unsubscribe/", f"{patient}/", "/metrics/", "/favicon.ico"):
        assert server.get(path).status == 404, path
    refused = server.request("PUT", patient, ONE_CLICK)
    assert refused.status == 405 and "GET" in refused.headers["Allow"]


# --- every page: headers, HTML, nothing from outside --------------------------------------------


def every_page(server: Served, patient: str) -> dict[str, Answer]:
    return {
        "ask": server.get(patient),
        "bad request": server.post_form(patient, "nope=1"),
        "unknown link": server.get(f"/unsubscribe/{tampered(patient)[0]}"),
        "not found": server.get("/nowhere"),
        "method": server.request("DELETE", patient),
        "health": server.get("/healthz"),
        "done": server.post_form(patient, ONE_CLICK),
    }


def test_every_page_sends_the_security_headers_and_loads_nothing_from_anywhere(
    server: Served, patient: str
) -> None:
    for name, answer in every_page(server, patient).items():
        for header, value in HEADERS.items():
            assert answer.headers[header] == value, (name, header)
        policy = dict(
            part.strip().split(" ", 1)
            for part in answer.headers["Content-Security-Policy"].split(";")
        )
        assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
        assert policy["form-action"] == "'self'" and policy["base-uri"] == "'none'"
        assert "Set-Cookie" not in answer.headers
        if answer.headers["Content-Type"].startswith("text/html"):
            (style,) = re.findall(r"<style>(.*?)</style>", answer.text, re.S)
            digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
            assert policy["style-src"] == f"'sha256-{digest}'", name  # the browser applies it
            assert not re.search(r"<(script|img|link|iframe|object)\b|@import|url\(", answer.text)


def test_every_page_is_valid_html_that_echoes_nothing_from_the_request(
    server: Served, patient: str
) -> None:
    token = patient.rsplit("/", 1)[1]
    for name, answer in every_page(server, patient).items():
        if not answer.headers["Content-Type"].startswith("text/html"):
            continue
        html5lib.HTMLParser(strict=True).parse(answer.body)  # raises on any parse error
        assert answer.text.startswith("<!DOCTYPE html>"), name
        assert token not in answer.text and "nope" not in answer.text, name


# --- logs ---------------------------------------------------------------------------------------


def test_no_log_line_holds_a_token_or_a_public_id(
    server: Served, patient: str, engine: Engine
) -> None:
    token = patient.rsplit("/", 1)[1]
    every_page(server, patient)
    server.request("GET", patient.replace("/unsubscribe/", "/%75nsubscribe%2F"))
    server.post_form(patient, ONE_CLICK)
    assert server.stop() == 0
    logs = server.logs()
    assert '"GET /unsubscribe/… HTTP/1.1" 200' in logs
    assert '"POST /unsubscribe/… HTTP/1.1" 200' in logs
    assert re.search(r"patient \d+ unsubscribed \(one-click\)", logs)
    assert token not in logs and token.split(".")[0] not in logs and token.split(".")[1] not in logs
    assert "ana@example.com" not in logs and "Ana" not in logs and "Traceback" not in logs



def test_under_drip_log_format_json_every_line_drip_serve_writes_is_json_without_a_token(
    env: dict[str, str], patient: str, tmp_path: Path
) -> None:
    token = patient.rsplit("/", 1)[1]
    with serving(env | {"DRIP_LOG_FORMAT": "json"}, tmp_path / "json") as server:
        server.post_form(patient, ONE_CLICK)
        server.get(patient + "/nope")
    lines = [line for line in server.logs().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # ValueError names the first line that is not
    assert {line["service"] for line in parsed} == {"serve"}
    messages = [line["message"] for line in parsed]
    assert any('"POST /unsubscribe/… HTTP/1.1" 200' in m for m in messages)
    assert any(re.search(r"patient \d+ unsubscribed \(one-click\)", m) for m in messages)
    assert any(line["level"] == "WARNING" and "not https" in line["message"] for line in parsed)
    assert token not in server.logs() and token.split(".")[0] not in server.logs()

def test_the_log_filter_hides_tokens_in_messages_and_tracebacks() -> None:
    secret = "/unsubscribe/abcdefghijklmnopqrstuv.ABCDEFGHIJKLMNOPQRSTUV"
    try:
        raise ValueError(f"while handling {secret}")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "on %s", (secret,), sys.exc_info()
        )
    TokenFilter().filter(record)
    shown = logging.Formatter().format(record)
    assert "abcdefghij" not in shown and shown.count("/unsubscribe/…") == 2


def test_the_environ_path_is_hidden_however_the_token_is_spelled() -> None:
    environ = {
        "RAW_URI": "/%75nsubscribe%2Fabc.def?x=1",
        "REQUEST_URI": "/UNSUBSCRIBE/abc.def",
        "PATH_INFO": "/unsubscribe/abc.def",
        "QUERY_STRING": "x=1",
    }
    hide_path(environ)
    assert environ["RAW_URI"] == environ["PATH_INFO"] == "/unsubscribe/…"
    assert environ["REQUEST_URI"] == "/UNSUBSCRIBE/…"
    assert hide_tokens("GET /healthz") == "GET /healthz"


# --- health and a database that is down ---------------------------------------------------------


def test_healthz_answers_ok_when_the_database_is_there(server: Served) -> None:
    health = server.get("/healthz")
    assert (health.status, health.text) == (200, "ok\n")
    assert health.headers["Content-Type"].startswith("text/plain")


def down_databases(tmp_path: Path) -> dict[str, str]:
    return {
        "postgresql": f"postgresql://drip:s3cret-pw@127.0.0.1:{closed_port()}/drip",
        "sqlite": f"sqlite:///{tmp_path / 'removed' / 'drip.db'}",
    }


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_healthz_is_503_naming_no_host_when_the_database_is_unreachable_and_pages_say_try_later(
    env: dict[str, str], tmp_path: Path, kind: str
) -> None:
    url = down_databases(tmp_path)[kind]
    with serving(env | {"DRIP_DATABASE_URL": url}, tmp_path / "serve") as server:
        health = server.get("/healthz")
        assert health.status == 503
        assert health.text == "database unreachable (the reason is in drip serve's log)\n"
        assert "Traceback" not in health.text and "s3cret" not in health.text
        page_path = f"/unsubscribe/{make_token(TEST_SECRET, 'Q' * 22)}"
        for page in (server.get(page_path), server.post_form(page_path, ONE_CLICK)):
            assert page.status == 503 and page.headers["Retry-After"] == "60"
            assert all(page.headers[header] == value for header, value in HEADERS.items())
            assert "Please try again in a few minutes" in page.text and PHONE in page.text
            assert "Traceback" not in page.text and "s3cret" not in page.text
    logs = server.logs()
    assert "warning: database unreachable" in logs and "s3cret" not in logs
    assert "/healthz: database unreachable: " in logs  # the driver's reason, for the operator
    assert not (tmp_path / "removed").exists()  # the server never creates a database


# --- starting and stopping -----------------------------------------------------------------------


def test_sigterm_stops_it_with_0_and_ctrl_c_with_130(env: dict[str, str], tmp_path: Path) -> None:
    with serving(env, tmp_path / "term") as server:
        assert server.stop(signal.SIGTERM) == 0
    with serving(env, tmp_path / "int") as server:
        assert server.stop(signal.SIGINT) == 130
    assert "interrupted" in server.logs() and "Traceback" not in server.logs()


def test_a_port_in_use_is_one_message_with_the_fix_and_exit_1(
    env: dict[str, str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start(env, tmp_path, "--port", str(port))
        assert process.wait(60) == 1
    err = (tmp_path / "serve.err").read_text()
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in err and "--port" in err
    assert "Traceback" not in err


def test_a_database_without_drips_tables_stops_it_with_the_fix(
    env: dict[str, str], tmp_path: Path
) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    process = start(
        env | {"DRIP_DATABASE_URL": f"sqlite:///{empty}"}, tmp_path, "--port", str(free_port())
    )
    assert process.wait(60) == 1
    err = (tmp_path / "serve.err").read_text()
    assert "run `drip db upgrade`" in err and "Traceback" not in err


# --- in-process: the factory and the palette ---------------------------------------------------


def test_create_app_without_settings_reads_the_environment(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (env | {"DRIP_CLINIC_NAME": "Harbour Clinic"}).items():
        monkeypatch.setenv(name, value)
    with in_process(None) as client:
        assert client.get("/healthz").status_code == 200
        assert "Harbour Clinic" in client.get("/nowhere").text


@contextmanager
def in_process(settings: Settings | None) -> Iterator[FlaskClient]:
    """The application without a server (Flask's test client), its engine disposed after."""
    app = create_app(settings)
    try:
        yield app.test_client()
    finally:
        app.extensions["drip"].engine.dispose()


def luminance(colour: str) -> float:
    channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def palettes() -> dict[str, dict[str, str]]:
    """The --colours of page.css: the first :root block (light), and the dark one."""
    css = (WEB_TEMPLATES / "page.css").read_text()
    light, dark = re.findall(r":root\s*{([^}]*)}", css)
    assert "prefers-color-scheme: dark" in css[: css.index(dark)]

    def colours(block: str) -> dict[str, str]:
        return dict(re.findall(r"--([\w-]+):\s*(#[0-9a-fA-F]{6})\s*;", block))

    return {"light": colours(light), "dark": colours(dark)}


TEXT_PAIRS = [  # (text, background) as page.css uses them
    ("text", "card"), ("brand", "card"), ("muted", "card"), ("link", "card"),
    ("text", "box"), ("link", "box"), ("on-accent", "accent"),
    ("muted", "page"), ("text", "page"), ("link", "page"),
]  # fmt: skip
EDGE_PAIRS = [("accent", "card"), ("accent", "page")]  # the button's edge and the focus ring


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_text_colour_of_the_pages_has_a_contrast_of_at_least_4_5(scheme: str) -> None:
    colours = palettes()[scheme]
    used = {name for pair in TEXT_PAIRS + EDGE_PAIRS for name in pair}
    assert used == set(colours), "a colour of page.css is not checked here (or is gone)"
    rules = re.sub(
        r":root\s*{[^}]*}|/\*.*?\*/", "", (WEB_TEMPLATES / "page.css").read_text(), flags=re.S
    )
    assert not re.findall(r"#[0-9a-fA-F]{3,8}\b|rgb|hsl", rules)  # every colour is a --name
    for text, background in TEXT_PAIRS:
        ratio = contrast(colours[text], colours[background])
        assert ratio >= 4.5, f"{scheme}: {text} on {background} is {ratio:.2f}:1"
    for edge, background in EDGE_PAIRS:
        assert contrast(colours[edge], colours[background]) >= 3.0, (scheme, edge, background)


def test_the_pages_use_the_emails_palette_and_fonts() -> None:
    layout = (WEB_TEMPLATES.parent / "emails" / "_layout.html.j2").read_text()
    css = (WEB_TEMPLATES / "page.css").read_text()
    for colour in palettes()["light"].values():
        assert colour.lower() in layout.lower(), colour
    for font in ("Georgia, 'Times New Roman', serif", "Arial, Helvetica, sans-serif"):
        assert font in layout and font in css


def test_the_settings_clinic_phone_becomes_a_tel_link(env: dict[str, str]) -> None:
    with in_process(Settings.from_env(env | {"DRIP_CLINIC_PHONE": "(555) 010-0199"})) as client:
        assert 'href="tel:5550100199"' in client.get("/nowhere").text
