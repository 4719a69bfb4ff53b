"""`drip demo`: the real pipeline — SQLite, a private Redis, a Celery worker and the ticker — with
the calendar moved forward from one due time to the next, so weeks of a campaign play in about a
minute. Nothing is faked: the demo only writes the shared clock file (DRIP_NOW_FILE) that every
process reads, and waits for the worker to deliver what fell due. Emails land in var/demo/outbox
as .eml files, each with an .html copy to open in a browser.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlalchemy import Engine, func, select

from drip import db, enrolment, output
from drip.broker import EmbeddedRedis
from drip.campaigns import load_campaign
from drip.clock import read_clock_file, write_clock_file
from drip.errors import DripError
from drip.models import (
    ACTIVE,
    CLAIMED,
    FAILED,
    IN_FLIGHT_STATES,
    RETRY,
    SCHEDULED,
    SENDING,
    SENT,
    SKIPPED,
    WAITING_STATES,
    Delivery,
    Enrolment,
    Patient,
)
from drip.patients import check_patient, zone
from drip.permissions import private_folder
from drip.processes import die_with_parent
from drip.settings import Settings, stored_secret

CAMPAIGN = "ketamine-onboarding"
STEP_TIMEOUT = 60.0
KEPT_FROM_ENV = (
    "DRIP_FROM",
    "DRIP_PUBLIC_URL",
    "DRIP_SEND_WINDOW",
    "DRIP_TEMPLATES_DIR",
    "DRIP_CLINIC_NAME",
    "DRIP_CLINIC_ADDRESS",
    "DRIP_CLINIC_PHONE",
    "DRIP_CLINIC_TIMEZONE",
)
SHOWN_STATES = (SCHEDULED, CLAIMED, SENDING, SENT, SKIPPED, RETRY, FAILED)  # the view's columns
OWED_STATES = (*WAITING_STATES, *IN_FLIGHT_STATES)  # the worker still owes these an outcome
SAMPLES = [  # first name, last name, zone, first session: days after the start, local time
    ("Ana", "López", "America/New_York", 3, "14:00"),
    ("Zoë", "O'Brien", "Europe/London", 5, "10:30"),
    ("Kenji", "", "America/Los_Angeles", 4, None),
    ("José-María", "Núñez", "America/Chicago", None, None),  # first session set later
]


@dataclass
class Demo:
    root: Path
    patients: int = 4
    console: Console = field(default_factory=output.console)  # plain and unwrapped when piped

    def run(self) -> None:
        self._fresh()
        start = _next_monday_morning()
        write_clock_file(self.now_file, start)
        env = self._env()
        settings = replace(Settings.from_env(env), var_dir=self.root)
        engine = db.make_engine(settings.database_url)
        db.upgrade(engine)
        self._enrol(engine, settings, start)
        redis = EmbeddedRedis(self.root)
        env["DRIP_BROKER_URL"] = redis.start()
        children: list[subprocess.Popen[bytes]] = []
        try:
            children = [
                self._spawn(["worker", "--concurrency=1"], env, "worker.log"),
                self._spawn(["beat"], env, "beat.log"),
            ]
            self._play(engine, settings)
        finally:
            for child in children:
                child.terminate()
            for child in children:
                child.wait(30)
            redis.stop()
        self._finish(engine)

    # --- setting up -------------------------------------------------------------------------

    @property
    def now_file(self) -> Path:
        return self.root / "now"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    def _fresh(self) -> None:
        for name in ("drip.db", "drip.db-wal", "drip.db-shm", "outbox", "now"):
            path = self.root / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        private_folder(self.root)

    def _env(self) -> dict[str, str]:
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith("DRIP_") or k in KEPT_FROM_ENV
        }
        return inherited | {
            "DRIP_DATABASE_URL": f"sqlite:///{self.root.resolve()}/drip.db",
            "DRIP_MAIL_URL": f"file://{self.outbox.resolve()}",
            "DRIP_NOW_FILE": str(self.now_file.resolve()),
            "DRIP_SECRET_KEY": stored_secret(self.root),  # root is the demo's var_dir
            "DRIP_TICK_SECONDS": "0.5",
        }

    def _enrol(self, engine: Engine, settings: Settings, start: datetime) -> None:
        planner = enrolment.Planner(
            load_campaign(settings.templates_dir, CAMPAIGN),
            settings.send_window,
            start,
            settings.min_gap,
        )
        rows = []
        for i in range(self.patients):
            first, last, tz, days, at = SAMPLES[i % len(SAMPLES)]
            session_day = (
                start.astimezone(zone(tz)).date() + timedelta(days=days)
                if days is not None
                else None
            )
            checked = check_patient(
                {
                    "email": f"demo-patient-{i + 1}@example.com",
                    "first_name": first,
                    "last_name": last,
                    "timezone": tz,
                    "first_session": f"{session_day}T{at}" if at else str(session_day or ""),
                },
                default_timezone=settings.clinic_timezone,
                now=start,
            )
            if isinstance(checked, list):
                raise DripError(f"demo patient {i + 1}: {checked[0]}")
            rows.append(checked)
        with db.transaction(engine) as session:
            enrolment.enrol(session, planner, rows, actor="demo")
        self.console.print(
            f"enrolled {len(rows)} sample patient{'s' * (len(rows) != 1)} on "
            f"{start.astimezone(zone(settings.clinic_timezone)):%A %d %B %Y}\n"
        )

    def _spawn(self, args: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        out: IO[bytes] = (self.root / log).open("wb")
        return subprocess.Popen(
            [sys.executable, "-m", "drip", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # a demo killed with -9 leaves no worker behind
        )

    # --- playing the calendar -------------------------------------------------------------------

    def _play(self, engine: Engine, settings: Settings) -> None:
        rescheduled = False
        with Live(
            self._view(engine, settings),
            console=self.console,
            transient=False,
            refresh_per_second=4,
        ) as live:
            while (due := _next_due(engine)) is not None:
                now = read_clock_file(self.now_file)
                if due > now:
                    write_clock_file(self.now_file, due)
                self._wait_until_delivered(engine, live, settings)
                if not rescheduled and due - _first_enrolled(engine) > timedelta(days=1):
                    rescheduled = True
                    if note := self._reschedule_last(engine, settings):
                        live.console.print(f"{note}\n")
                live.update(self._view(engine, settings))
        if not self.console.is_terminal:
            self.console.line()  # Live ends its last line on a terminal only
        self.console.line()

    def _wait_until_delivered(self, engine: Engine, live: Live, settings: Settings) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while _owed(engine, read_clock_file(self.now_file)):
            if time.monotonic() > deadline:
                raise DripError(f"the worker did not deliver in time; see {self.root}/worker.log")
            live.update(self._view(engine, settings))
            time.sleep(0.2)

    def _reschedule_last(self, engine: Engine, settings: Settings) -> str | None:
        """Show a coordinator setting a first session that was not known at enrolment."""
        now = read_clock_file(self.now_file)
        with db.transaction(engine) as session:
            waiting = session.execute(
                select(Enrolment, Patient)
                .join(Patient, Patient.id == Enrolment.patient_id)
                .where(Enrolment.first_session_on.is_(None), Enrolment.status == ACTIVE)
            ).first()
            if waiting is None:
                return None
            enrolment_row, patient = waiting
            day = now.astimezone(zone(patient.timezone)).date() + timedelta(days=4)
            planner = enrolment.Planner(
                load_campaign(settings.templates_dir, CAMPAIGN),
                settings.send_window,
                now,
                settings.min_gap,
            )
            enrolment.reschedule(
                session, enrolment_row, planner, patient.timezone, f"{day}T11:00", actor="demo"
            )
            name = patient.first_name
        return (
            f"a coordinator sets {name}'s first session to {day} 11:00 (drip reschedule): "
            "the emails that waited for it are planned now"
        )

    def _view(self, engine: Engine, settings: Settings) -> Table:
        now = read_clock_file(self.now_file).astimezone(zone(settings.clinic_timezone))
        with engine.connect() as connection:
            counts = dict(
                connection.execute(
                    select(Delivery.state, func.count()).group_by(Delivery.state)
                ).all()
            )
        view = Table(title=f"clinic time {now:%a %d %b %H:%M %Z}", box=None)
        for state in SHOWN_STATES:
            view.add_column(state, justify="right")
        view.add_row(*(str(counts.get(s, 0)) for s in SHOWN_STATES))
        return view

    # --- the end ------------------------------------------------------------------------------

    def _finish(self, engine: Engine) -> None:
        emails = sorted(self.outbox.glob("*.eml"))
        for eml in emails:
            eml.with_suffix(".html").write_text(_html_part(eml.read_bytes()), encoding="utf-8")
        table = Table("patient", "step", "state", "local time", box=None)
        with engine.connect() as connection:
            rows = connection.execute(
                select(
                    Patient.first_name,
                    Patient.timezone,
                    Delivery.step_key,
                    Delivery.state,
                    Delivery.sent_at,
                    Delivery.due_at,
                )
                .join(Enrolment, Enrolment.patient_id == Patient.id)
                .join(Delivery, Delivery.enrolment_id == Enrolment.id)
                .order_by(Patient.id, Delivery.id)
            ).all()
        for first, tz, step, state, sent_at, due_at in rows:
            when = sent_at or due_at
            shown = f"{when.astimezone(zone(tz)):%a %d %b %H:%M %Z}" if when else "-"
            table.add_row(first, step, state, shown)
        self.console.print(table)
        self.console.print(
            f"\n{len(emails)} emails delivered to {self.outbox}/ — each as .eml, and as .html to "
            f"open in a browser, e.g.\n  {emails[0].with_suffix('.html') if emails else ''}"
        )


def _next_monday_morning() -> datetime:
    today = date.today()
    monday = today + timedelta(days=(7 - today.weekday()) % 7 or 7)
    return datetime.combine(monday, clock_time(8, 30), tzinfo=zone("America/New_York"))


def _next_due(engine: Engine) -> datetime | None:
    with engine.connect() as connection:
        return connection.scalar(
            select(func.min(Delivery.due_at))
            .join(Enrolment, Enrolment.id == Delivery.enrolment_id)
            .where(
                Delivery.state.in_(OWED_STATES),
                Delivery.due_at.is_not(None),
                Enrolment.status == ACTIVE,
            )
        )


def _owed(engine: Engine, now: datetime) -> int:
    with engine.connect() as connection:
        return int(
            connection.scalar(
                select(func.count())
                .select_from(Delivery)
                .join(Enrolment, Enrolment.id == Delivery.enrolment_id)
                .where(
                    Delivery.state.in_(OWED_STATES),
                    Delivery.due_at <= now,
                    Enrolment.status == ACTIVE,
                )
            )
            or 0
        )


def _first_enrolled(engine: Engine) -> datetime:
    with engine.connect() as connection:
        value: datetime | None = connection.scalar(select(func.min(Enrolment.enrolled_at)))
    assert value is not None
    return value


def _html_part(raw: bytes) -> str:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    body = message.get_body(("html",))
    return str(body.get_content()) if body is not None else ""
