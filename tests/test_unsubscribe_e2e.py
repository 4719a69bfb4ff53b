"""Unsubscribing end to end, every part real: a `drip worker` (Celery prefork), the ticker
(`drip beat`), `drip serve` (gunicorn), a private redis-server, an SMTP server on loopback
(aiosmtpd), SQLite and PostgreSQL. The calendar is the shared clock file (DRIP_NOW_FILE) that
every process reads, moved from one due time to the next as `drip demo` does.

One set of processes serves every test of a database kind (they take a while to start); each
test has patients of its own, starts at 09:30 in New York on a day of its own, and looks only at
its own patients' rows and mail.

- A one-click POST to the link in a received email stops every later email; a control patient
  enrolled at the same moment, with the same plan, gets all eight.
- A row `claimed` in a batch the worker is sending (held at the SMTP server behind another
  patient's email) is skipped by the unsubscribe and never sent.
- Enrolling the patient again is refused; `--resubscribe --reason` enrols them, is recorded,
  and their email flows again.
- A canary patient (sent, unsubscribed, resubscribed, bounced 5.1.1) appears in no log of any
  process and in no Redis key, value or published message; the search is shown to find what it
  looks for first. On SQLite the processes run with DRIP_LOG_FORMAT=json (ignored by a drip
  that does not know it yet), on PostgreSQL with the default text lines.
- On PostgreSQL, the database dropping the worker's connection while it looks a bouncing
  patient up by address leaves no address in the error the worker logs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlencode, urlsplit
from zoneinfo import ZoneInfo

import pytest
import redis
from click.testing import CliRunner, Result
from sqlalchemy import Connection, TextClause, create_engine, select, text
from sqlalchemy.orm import Session

from drip import db
from drip.broker import redis_client
from drip.cli import App, cli
from drip.clock import write_clock_file
from drip.models import Delivery, Enrolment, Event, Patient
from drip.tokens import make_token
from tests.conftest import TABLES, TEST_SECRET
from tests.polling import wait_until
from tests.serving import Answer, Served, serving
from tests.smtp_servers import CapturingServer, Held
from tests.test_pipeline import Pipeline, redis_url  # noqa: F401

pytestmark = pytest.mark.slow
CAMPAIGN = "ketamine-onboarding"
STEPS = 8  # in the shipped campaign
NEW_YORK = ZoneInfo("America/New_York")
START = datetime(2026, 10, 29, 9, 30, tzinfo=NEW_YORK)  # each test starts on a later morning
PUBLIC_URL = "https://care.clinic.example"  # the links' host; the tests send them to drip serve
LOG_FORMAT = {"sqlite": "json", "postgresql": "text"}
ONE_CLICK = "List-Unsubscribe=One-Click"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}  # and no Cookie: RFC 8058 §3.1
CONSENT = "consent by phone 2026-12-01"


# --- one set of processes per database kind ------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def database(
    db_kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated database of the kind, empty, for this module's tests."""
    if db_kind == "sqlite":
        path = tmp_path_factory.mktemp("e2e-sqlite") / "drip.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_url")  # the run's database: empty it before and after
    _truncate(url)
    yield url
    _truncate(url)


def _truncate(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(scope="module")
def line(
    db_kind: str,
    database: str,
    redis_url: str,  # noqa: F811 - the session fixture imported above
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Line]:
    root = tmp_path_factory.mktemp(f"e2e-{db_kind}")
    client = redis_client(redis_url)
    client.flushall()  # the run's private Redis: this module's alone while it runs
    client.close()
    write_clock_file(root / "now", START)
    engine = db.make_engine(database)
    with CapturingServer() as smtp:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
        env = clean | {
            "DRIP_DATABASE_URL": database,
            "DRIP_BROKER_URL": redis_url,
            "DRIP_MAIL_URL": f"smtp://127.0.0.1:{smtp.port}?timeout=30",  # a held reply waits
            "DRIP_NOW_FILE": str(root / "now"),
            "DRIP_SECRET_KEY": TEST_SECRET,
            "DRIP_PUBLIC_URL": PUBLIC_URL,
            "DRIP_TICK_SECONDS": "0.2",
            "DRIP_LEASE_SECONDS": "300",  # leases run out only when a test moves the calendar
            "DRIP_BATCH_SIZE": "20",
            "DRIP_LOG_FORMAT": LOG_FORMAT[db_kind],
        }
        pipeline = Pipeline(root, env, engine, smtp)
        try:
            pipeline.worker(concurrency=2)  # they start while drip serve does
            pipeline.beat()
            with serving(env, root / "serve") as served:
                yield Line(pipeline, served, redis_url, db_kind)
        finally:
            pipeline.stop()
            engine.dispose()


@dataclass
class Line:
    """The running processes, and what the tests do with them."""

    pipeline: Pipeline
    served: Served
    redis_url: str
    db_kind: str

    @property
    def smtp(self) -> CapturingServer:
        return self.pipeline.smtp

    # --- the calendar -------------------------------------------------------------------------

    def morning(self) -> datetime:
        """Finish what is due, then move the calendar to 09:30 in New York the next day (inside
        the send window: a welcome goes at once) and finish what fell due meanwhile."""
        self.pipeline.wait_settled()
        local = self.pipeline.now().astimezone(NEW_YORK)
        morning = datetime.combine(local.date() + timedelta(days=1), time(9, 30), NEW_YORK)
        self.pipeline.set_now(morning)
        self.pipeline.wait_settled()
        return morning

    def walk_until(self, condition: Callable[[], object], what: str) -> None:
        """Move the calendar from one due time to the next, each once nothing is owed (nothing
        is in flight then), until `condition` holds."""

        def moved_on() -> object:
            if done := condition():
                return done
            due = self.pipeline.next_due()
            if not self.pipeline.owed() and due is not None and due > self.pipeline.now():
                self.pipeline.set_now(due)
            return False

        wait_until(moved_on, what, describe=self.describe)

    # --- the coordinator's command line, against the same database ------------------------------

    def drip(self, *args: str, input: str | None = None) -> Result:
        app = App(environ=self.pipeline.env)
        try:
            return CliRunner().invoke(cli, list(args), obj=app, input=input)
        finally:
            app.close()

    def enrol(self, *rows: str) -> None:
        """Enrol CSV rows (email,first_name,last_name,timezone,first_session) at one moment."""
        body = "email,first_name,last_name,timezone,first_session\n" + "\n".join(rows) + "\n"
        result = self.drip("enroll", "--csv", "-", "--campaign", CAMPAIGN, input=body)
        assert result.exit_code == 0, result.output

    # --- the database ---------------------------------------------------------------------------

    def patient(self, address: str) -> Patient:
        with Session(self.pipeline.engine) as session:
            found = session.scalars(select(Patient).where(Patient.email == address)).one()
        return found

    def deliveries(self, address: str) -> list[Delivery]:
        """The patient's rows, oldest enrolment first, each in plan order."""
        with Session(self.pipeline.engine) as session:
            return list(
                session.scalars(
                    select(Delivery)
                    .join(Enrolment, Enrolment.id == Delivery.enrolment_id)
                    .join(Patient, Patient.id == Enrolment.patient_id)
                    .where(Patient.email == address)
                    .order_by(Enrolment.id, Delivery.due_at, Delivery.id)
                )
            )

    def welcome(self, address: str) -> Delivery:
        """The first email of the patient's newest enrolment."""
        return [row for row in self.deliveries(address) if row.step_key == "welcome"][-1]

    def events(self, address: str) -> list[Event]:
        patient_id = self.patient(address).id
        with Session(self.pipeline.engine) as session:
            query = select(Event).where(Event.patient_id == patient_id).order_by(Event.id)
            return list(session.scalars(query))

    # --- mail -----------------------------------------------------------------------------------

    def wait_held(self, before: int) -> Held:
        """The one message held back since `before` were (the server keeps every one held)."""
        (held,) = self.smtp.wait_held(before + 1)[before:]
        return held

    def mail_to(self, address: str) -> list[EmailMessage]:
        return [
            _parse(m.data) for m in self.smtp.messages if address in (r.lower() for r in m.rcpt_tos)
        ]

    def wait_for_mail(self, address: str, n: int) -> list[EmailMessage]:
        return wait_until(
            lambda: (mail := self.mail_to(address)) and len(mail) >= n and mail,
            f"{n} email(s) to {address}",
            describe=self.describe,
        )

    def link(self, message: EmailMessage) -> str:
        """The path of the message's List-Unsubscribe URL, after checking the URL is drip's
        public one: the request goes to this test's drip serve, as the reverse proxy would."""
        (url,) = re.findall(r"<(https://[^>]+)>", str(message["List-Unsubscribe"]))
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}" == PUBLIC_URL, url
        assert message["List-Unsubscribe-Post"] == ONE_CLICK
        return parts.path

    def link_of(self, address: str) -> str:
        """The path an email to the patient would carry (for a patient whose email never went)."""
        return f"/unsubscribe/{make_token(TEST_SECRET, self.patient(address).public_id)}"

    def one_click(self, path: str) -> Answer:
        """What a mail provider sends for RFC 8058 one-click: a form POST, no cookie."""
        return self.served.request("POST", path, ONE_CLICK, FORM)

    # --- what went wrong ------------------------------------------------------------------------

    def logs(self) -> dict[str, str]:
        """Every process's output: worker and beat, drip serve's error and access logs."""
        files = [*sorted(self.pipeline.root.glob("*.log"))]
        files += [self.served.root / "serve.err", self.served.root / "serve.out"]
        return {f.name: f.read_text(encoding="utf-8", errors="replace") for f in files}

    def worker_log(self) -> str:
        return "".join(text for name, text in self.logs().items() if name.startswith("worker"))

    def describe(self) -> str:
        return f"states {self.pipeline.states()}\n{self.pipeline.logs()}\n{self.served.logs()}"


def _parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


# --- 1. the real pipeline ----------------------------------------------------------------------


def test_after_a_one_click_unsubscribe_through_drip_serve_no_later_email_arrives(
    line: Line,
) -> None:
    leaver, control = "lennox.leaver.e2e@example.com", "constance.control.e2e@example.com"
    morning = line.morning()
    first_session = f"{morning.date() + timedelta(days=5)}T14:00"
    line.enrol(
        f"{leaver},Lennox,Leaver,America/New_York,{first_session}",
        f"{control},Constance,Control,America/New_York,{first_session}",
    )
    (welcome,) = line.wait_for_mail(leaver, 1)
    answer = line.one_click(line.link(welcome))
    assert answer.status == 200, answer.text
    assert "You are unsubscribed" in answer.text
    assert "Set-Cookie" not in answer.headers and "Location" not in answer.headers

    line.pipeline.walk()  # every later step falls due, one after the other: weeks of them
    leaving, staying = line.deliveries(leaver), line.deliveries(control)
    # Enrolled at one moment with one first session: one plan, so the control's emails arriving
    # show that the ticker ran past every one of the leaver's steps.
    assert [(r.step_key, r.due_at) for r in leaving] == [(r.step_key, r.due_at) for r in staying]
    assert len(staying) == STEPS and {r.state for r in staying} == {"sent"}
    assert len(line.mail_to(control)) == STEPS
    assert line.pipeline.now() > max(r.due_at for r in leaving if r.due_at)
    assert [(r.step_key, r.state) for r in leaving] == [("welcome", "sent")] + [
        (r.step_key, "skipped") for r in leaving[1:]
    ]
    assert {r.last_error for r in leaving[1:]} == {"unsubscribed"}
    assert [m["Message-ID"] for m in line.mail_to(leaver)] == [welcome["Message-ID"]]


# --- 2. a claimed row in a running worker's batch -------------------------------------------------


def test_a_row_claimed_in_a_batch_the_worker_is_sending_is_skipped_and_never_sent(
    line: Line,
) -> None:
    ahead, leaver = "hollis.ahead.e2e@example.com", "clara.claimed.e2e@example.com"
    line.morning()
    before = len(line.smtp.held)
    line.smtp.hold()  # the worker will wait for the reply to its batch's first email
    try:
        line.enrol(f"{ahead},Hollis,Ahead,America/New_York,", f"{leaver},Clara,Claimed,,")
        held = line.wait_held(before)
        assert held.message.rcpt_tos == (ahead,), "a batch goes in order of due time, then id"
        first, behind = line.welcome(ahead), line.welcome(leaver)
        assert (first.state, behind.state) == ("sending", "claimed")
        # one task holds both ids, and the worker has taken it (Redis keeps it as unacked)
        batch = f"[{first.id}, {behind.id}]"
        assert [k for k, v in redis_texts(line.redis_url).items() if "unacked" in k and batch in v]

        answer = line.one_click(line.link_of(leaver))
        assert answer.status == 200, answer.text
        assert {r.state for r in line.deliveries(leaver)} == {"skipped"}
    finally:
        line.smtp.release()
    # `sent` for the first is recorded by the commit that would mark the next one `sending`
    wait_until(lambda: line.welcome(ahead).state == "sent", "the batch to go on", 60)
    line.pipeline.wait_settled()
    # the worker's report: it had the row in hand, and found it no longer its to send
    report = re.compile(r"batch of 2: \{[^}]*'not_ours': 1[,}]")
    wait_until(lambda: report.search(line.worker_log()), "the batch's report")
    behind = line.welcome(leaver)
    assert (behind.state, behind.last_error) == ("skipped", "unsubscribed")
    assert line.mail_to(leaver) == [] and len(line.mail_to(ahead)) == 1


# --- 3. enrolling again ------------------------------------------------------------------------


class _Form(HTMLParser):
    """The fields the page's one form posts: its hidden inputs and its button."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag in ("input", "button") and found.get("name"):
            self.fields[str(found["name"])] = found.get("value") or ""


def test_enrolling_an_unsubscribed_patient_is_refused_and_resubscribe_sends_again(
    line: Line,
) -> None:
    address = "rory.resubscribed.e2e@example.com"
    enrol = ("enroll", address, "--campaign", CAMPAIGN, "--first-name", "Rory")
    line.morning()
    assert line.drip(*enrol).exit_code == 0
    (welcome,) = line.wait_for_mail(address, 1)
    link = line.link(welcome)
    page = line.served.get(link)  # the patient opens the link, and presses the button
    assert page.status == 200
    pressed = line.served.request("POST", link, urlencode(_Form(page.text).fields), FORM)
    assert pressed.status == 200, pressed.text
    planned = len(line.deliveries(address))

    refused = line.drip(*enrol)
    assert refused.exit_code == 1
    assert "suppressed since " in refused.output and "(unsubscribed)" in refused.output
    assert '--resubscribe --reason "…"' in refused.output
    assert len(line.deliveries(address)) == planned  # nothing written

    again = line.drip(*enrol, "--resubscribe", "--reason", CONSENT, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["resubscribed"] is True
    events = line.events(address)
    kinds = [e.kind for e in events]
    assert kinds.index("patient.unsubscribed") < kinds.index("patient.resubscribed")
    (resubscribed,) = [e for e in events if e.kind == "patient.resubscribed"]
    assert resubscribed.actor == App().actor  # cli:<this user>
    assert resubscribed.detail is not None and CONSENT in resubscribed.detail
    assert "source=page" in str(events[kinds.index("patient.unsubscribed")].detail)

    # the new enrolment's welcome waits DRIP_MIN_GAP after the first one, then goes
    line.walk_until(lambda: len(line.mail_to(address)) == 2, "the new welcome to arrive")
    rows = line.deliveries(address)
    assert line.welcome(address).state == "sent"
    assert line.welcome(address).enrolment_id != rows[0].enrolment_id


# --- 4. the canary ------------------------------------------------------------------------------

CANARY_FIRST, CANARY_LAST = "Zzcanaryq", "Qqcanaryz"
CANARY = "zz.canary.4417@example.org"
BOUNCE = f"550 5.1.1 <{CANARY}>: Recipient address rejected: User unknown in virtual mailbox table"
# Each is looked for whatever its case: ZZ.CANARY.4417@EXAMPLE.ORG, zzcanaryq, …
NEEDLES = (CANARY_FIRST, CANARY_LAST, CANARY, CANARY.split("@")[0])
PROBES = {kind: f"zz-probe-{kind}-4417" for kind in ("string", "list", "hash", "set", "zset")}
PUBLISHED_PROBE, LOGGED_PROBE = "zz-probe-published-4417", "zz-probe-logged-4417"


def sightings(needles: Iterable[str], texts: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(needle, source, excerpt) for each needle found in `texts` (source -> text), whatever
    its case."""
    found = []
    for source, haystack in texts.items():
        lower = haystack.lower()
        for needle in needles:
            at = lower.find(needle.lower())
            if at >= 0:
                found.append((needle, source, haystack[max(0, at - 100) : at + 100]))
    return found


_ENCODED = re.compile(rb"[A-Za-z0-9+/_-]{12,}={0,2}")


def unfolded(raw: bytes, depth: int = 3) -> str:
    """`raw` as text, then whatever base64 inside it decodes to as text, unfolded in turn:
    Celery's Redis transport keeps a task as JSON whose body is base64 JSON (its arguments)."""
    parts = [raw.decode("utf-8", "replace")]
    if depth:
        for chunk in _ENCODED.findall(raw):
            urlsafe = b"-" in chunk or b"_" in chunk
            try:
                decoded = base64.b64decode(
                    chunk + b"=" * (-len(chunk) % 4), altchars=b"-_" if urlsafe else None
                )
                decoded.decode("utf-8")
            except ValueError:  # not base64, or not text (binascii.Error, UnicodeDecodeError)
                continue
            parts.append(unfolded(decoded, depth - 1))
    return "\n".join(parts)


def redis_texts(url: str) -> dict[str, str]:
    """Every key in every database of the Redis server at `url` with its value, read as its
    type says and unfolded: "db0 unacked (hash)" -> the key, its fields and their values."""
    found: dict[str, str] = {}
    main = redis_client(url)
    pool = main.connection_pool
    try:
        for name in main.info("keyspace"):  # "db0", "db3": the databases that hold keys
            kwargs = pool.connection_kwargs | {"db": int(name.removeprefix("db"))}
            client = redis.Redis(
                connection_pool=redis.ConnectionPool(
                    connection_class=pool.connection_class, **kwargs
                )
            )
            try:
                for key in client.scan_iter(count=1000):
                    kind = client.type(key).decode()
                    dumped = b"\n".join([key, *_values(client, key, kind)])
                    found[f"{name} {key.decode(errors='replace')} ({kind})"] = unfolded(dumped)
            finally:
                client.close()
    finally:
        main.close()
    return found


def _values(client: redis.Redis, key: bytes, kind: str) -> list[bytes]:
    if kind == "string":
        return [client.get(key) or b""]
    if kind == "list":
        return list(client.lrange(key, 0, -1))
    if kind == "hash":
        return [b for pair in client.hgetall(key).items() for b in pair]
    if kind == "set":
        return list(client.smembers(key))
    if kind == "zset":
        return [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
    if kind == "stream":
        return [repr(entry).encode() for entry in client.xrange(key)]
    return [client.dump(key) or b""]  # a type not listed here: its serialised form


def put_probes(url: str) -> None:
    """A value of each type holding a probe: the list's is a task as Celery queues one, the
    probe only inside its base64 body; the string's is in capitals."""
    client = redis_client(url)
    body = base64.b64encode(json.dumps([[[PROBES["list"]]], {}, {}]).encode()).decode()
    task = {"body": body, "content-encoding": "utf-8", "properties": {"body_encoding": "base64"}}
    client.set("e2e-probe:string", PROBES["string"].upper())
    client.lpush("e2e-probe:list", json.dumps(task))
    client.hset("e2e-probe:hash", "field", PROBES["hash"])
    client.sadd("e2e-probe:set", PROBES["set"])
    client.zadd("e2e-probe:zset", {PROBES["zset"]: 1})
    client.close()


def drop_probes(url: str) -> None:
    client = redis_client(url)
    client.delete(*(f"e2e-probe:{kind}" for kind in PROBES))
    client.close()


class Listener:
    """Every message published on the Redis server while it listens: Celery's events (a task
    sent, received, succeeded; heartbeats) travel by PUBLISH and are never stored."""

    def __init__(self, url: str) -> None:
        self.client = redis_client(url)
        self.pubsub = self.client.pubsub()
        self.heard: list[tuple[bytes, bytes]] = []
        self.pubsub.psubscribe(**{"*": self._hear})
        self.thread = self.pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _hear(self, message: dict[str, Any]) -> None:
        self.heard.append((message["channel"], message["data"]))

    def texts(self) -> dict[str, str]:
        return {
            f"published #{i} on {channel.decode(errors='replace')}": unfolded(data)
            for i, (channel, data) in enumerate(list(self.heard))
        }

    def close(self) -> None:
        self.thread.stop()
        self.thread.join(10)
        self.pubsub.close()
        self.client.close()


@dataclass
class Canary:
    """Everything the canary's run left where personal data must not be."""

    in_flight: dict[str, str]  # Redis while the worker held the canary's batch
    stored: dict[str, str]  # Redis at the end, with the probes
    published: dict[str, str]
    logs: dict[str, str]
    pages: dict[str, Answer]


def run_the_canary(line: Line) -> Canary:
    """Enrol, send, unsubscribe (the page, then one-click), resubscribe, bounce (5.1.1)."""
    line.morning()
    listener = Listener(line.redis_url)
    try:
        before = len(line.smtp.held)
        line.smtp.hold()  # while the worker holds the canary's batch, its task is in Redis
        try:
            line.enrol(f"{CANARY},{CANARY_FIRST},{CANARY_LAST},America/New_York,")
            assert line.wait_held(before).message.rcpt_tos == (CANARY,)
            in_flight = redis_texts(line.redis_url)
        finally:
            line.smtp.release()
        (welcome,) = line.wait_for_mail(CANARY, 1)
        link = line.link(welcome)
        pages = {"the page": line.served.get(link), "the confirmation": line.one_click(link)}
        line.smtp.refuse(CANARY, BOUNCE)  # a second run, with consent: the mailbox is gone
        names = ("--first-name", CANARY_FIRST, "--last-name", CANARY_LAST)
        again = line.drip("enroll", CANARY, "--campaign", CAMPAIGN, *names,
                          "--resubscribe", "--reason", CONSENT)  # fmt: skip
        assert again.exit_code == 0, again.output
        bounced = lambda: line.patient(CANARY).suppressed_reason == "bounce 5.1.1"  # noqa: E731
        line.walk_until(bounced, "the canary's bounce")
        pages["a page that is not there"] = line.served.get(f"/{LOGGED_PROBE}")
        served = lambda: line.logs()["serve.out"] + line.logs()["serve.err"]  # noqa: E731
        wait_until(lambda: LOGGED_PROBE in served(), "the access log line")
        _publish(line.redis_url, PUBLISHED_PROBE)
        wait_until(lambda: any(PUBLISHED_PROBE.encode() in d for _, d in listener.heard), "it")
    finally:
        listener.close()
    put_probes(line.redis_url)
    try:
        stored = redis_texts(line.redis_url)
    finally:
        drop_probes(line.redis_url)
    return Canary(in_flight, stored, listener.texts(), line.logs(), pages)


def _publish(url: str, message: str) -> None:
    client = redis_client(url)
    client.publish("e2e-probe", message)
    client.close()


def test_a_canary_patient_shows_in_no_log_and_no_redis_key_value_or_message(line: Line) -> None:
    canary = run_the_canary(line)
    rows, logs = line.deliveries(CANARY), canary.logs
    # What was sent, refused and logged is what the test means it to be…
    (sent,) = [r for r in rows if r.state == "sent"]
    (bounced,) = [r for r in rows if r.state == "failed"]
    assert bounced.last_error and "550 5.1.1" in bounced.last_error
    assert [p.status for p in canary.pages.values()] == [200, 200, 404]
    worker = line.worker_log()
    beat = "".join(text for name, text in logs.items() if name.startswith("beat"))
    assert "drip.send_batch" in worker and f"delivery {bounced.id} failed" in worker
    assert "drip.tick" in beat
    assert "POST /unsubscribe/" in logs["serve.out"] + logs["serve.err"]  # the access log
    assert "unsubscribed (one-click)" in logs["serve.err"]
    unacked = [v for k, v in canary.in_flight.items() if "unacked" in k]
    assert any(f"[[{sent.id}]]" in v for v in unacked), "the task, decoded, is the canary's"
    assert any("celeryev" in source for source in canary.published), "Celery's events, heard"
    # …and the search finds what it looks for, in every place, inside base64, in capitals.
    probes = {(n, s.split()[1]) for n, s, _ in sightings(PROBES.values(), canary.stored)}
    assert probes == {(probe, f"e2e-probe:{kind}") for kind, probe in PROBES.items()}
    assert sightings([PUBLISHED_PROBE], canary.published)
    assert [s for _, s, _ in sightings([LOGGED_PROBE], logs)] in (["serve.out"], ["serve.err"])
    patient = line.patient(CANARY)
    stored = {"patients": f"{patient.first_name} {patient.last_name} {patient.email}"}
    assert len(sightings(NEEDLES, stored)) == len(NEEDLES)  # the database holds them all

    recorded = [f"{r.last_error}" for r in rows] + [f"{e.detail}" for e in line.events(CANARY)]
    places = {
        **{f"log {name}": text for name, text in logs.items()},
        **{f"Redis while sending: {key}": v for key, v in canary.in_flight.items()},
        **{f"Redis at the end: {key}": v for key, v in canary.stored.items()},
        **canary.published,
        **{f"drip serve's {name}": answer.text for name, answer in canary.pages.items()},
        "errors and events recorded": "\n".join(recorded),
    }
    assert sightings(NEEDLES, places) == []


# --- 5. a database fault while the worker records a bounce ----------------------------------------

FAULTED_FIRST, FAULTED_LAST = "Yyfaultedq", "Qqfaultedy"
FAULTED = "yy.faulted.5521@example.org"
WAITING = text(
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND wait_event_type = 'Lock' AND query LIKE '%email_key%'"
)


def test_a_database_error_while_the_worker_records_a_bounce_names_no_one_in_its_log(
    line: Line,
) -> None:
    """The database drops the worker's connection (a failover; an operator's
    pg_terminate_backend) just as it looks the bouncing patient up by address: the error the
    worker logs, which quotes the statement, must not quote its parameters."""
    if line.db_kind != "postgresql":
        pytest.skip("SQLite never makes a reader wait for a lock: staged on PostgreSQL")
    engine = line.pipeline.engine
    line.morning()
    line.smtp.refuse(FAULTED, f"550 5.1.1 <{FAULTED}>: Recipient address rejected: User unknown")
    before = len(line.smtp.held)
    line.smtp.hold()  # the worker waits for the reply to RCPT, its row already `sending`
    with engine.connect() as lock, engine.connect() as watch:
        try:
            line.enrol(f"{FAULTED},{FAULTED_FIRST},{FAULTED_LAST},America/New_York,")
            line.wait_held(before)
            lock.execute(text("LOCK TABLE patients IN ACCESS EXCLUSIVE MODE"))
            line.smtp.release()  # 550 5.1.1: the worker records the bounce, and waits…
            pid = wait_until(lambda: _fresh(watch, WAITING), "the worker to wait for the lock")
            watch.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        finally:
            lock.rollback()
            line.smtp.release()
    wait_until(lambda: "AdminShutdown" in line.worker_log(), "the worker to log the error")
    needles = (FAULTED_FIRST, FAULTED_LAST, FAULTED, FAULTED.split("@")[0])
    assert sightings(needles, {"the worker's log": line.worker_log()}) == []
    # its outcome lost with the connection, the row is `unknown` once its lease has run out
    line.pipeline.expire_leases()
    wait_until(lambda: line.welcome(FAULTED).state == "unknown", "the lease to run out")


def _fresh(connection: Connection, query: TextClause) -> Any:
    """The query's first value, in a transaction of its own (PostgreSQL keeps one snapshot of
    pg_stat_activity for the whole of a transaction)."""
    try:
        return connection.scalar(query)
    finally:
        connection.rollback()
