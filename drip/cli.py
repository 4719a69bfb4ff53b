"""The `drip` command line (DESIGN §5). Each command parses, makes one call into the domain inside
one transaction, and prints. Exit codes: 0 done, 1 a user error (message on stderr naming the fix),
2 a usage error. Every DripError becomes its message here, in one place.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.exc import DatabaseError, IntegrityError
from sqlalchemy.orm import Session

from drip import __version__, csvimport, db, enrolment, logs, suppression
from drip.broker import broker, require_reachable
from drip.campaigns import Campaign, campaign_slugs, load_all, load_campaign
from drip.clock import parse_instant
from drip.deliveries import RetryPlan, list_deliveries, plan_by_ids, plan_by_state
from drip.deliveries import retry as retry_deliveries
from drip.durations import parse_duration
from drip.errors import CsvError, DripError, InputError, RowProblem
from drip.models import FAILED, STATES, UNKNOWN, Enrolment, Patient
from drip.output import console, echo_json, plain, table
from drip.patients import check_email, check_patient, check_reason
from drip.permissions import private_folder
from drip.settings import Settings
from drip.timeline import timeline as build_timeline

if TYPE_CHECKING:
    from drip.messages import Recipient
    from drip.metrics import WorkerExporter

T = TypeVar("T")
INTERRUPTED = 128 + 2  # a shell's exit code for a process ended by SIGINT


@dataclass
class App:
    """What every command needs, made on first use so that `--help` works with a bad environment."""

    environ: dict[str, str] | None = None
    actor: str = field(default_factory=lambda: f"cli:{_user()}")

    @cached_property
    def settings(self) -> Settings:
        settings = Settings.from_env(self.environ)
        logs.configure(settings, process="cli")  # DRIP_LOG_FORMAT, from the first command on
        return settings

    @cached_property
    def engine(self) -> Engine:
        return db.make_engine(self.settings.database_url)

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()

    def now(self) -> datetime:
        return self.settings.clock().now()

    def require_clock_in_step(self) -> None:
        """For the long-running commands: leases hold across hosts only if every host's clock
        agrees with the database's (skipped under DRIP_NOW: that calendar is not the database's)."""
        if self.settings.uses_real_clock:
            db.require_clock_in_step(self.engine)

    def campaign(self, slug: str) -> Campaign:
        return load_campaign(self.settings.templates_dir, slug)

    def planner(self, slug: str, now: datetime | None = None) -> enrolment.Planner:
        return enrolment.Planner(
            self.campaign(slug), self.settings.send_window, now or self.now(), self.settings.min_gap
        )

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        db.require_current_schema(self.engine)
        with db.transaction(self.engine) as session:
            yield session


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class DripGroup(click.Group):
    """Turns a DripError (or a database that cannot be reached or is busy) into a message and
    exit code 1, and Ctrl-C into one line and the shell's 130 (Click would say "Aborted!", 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DripError as e:
            raise click.ClickException(str(e)) from None
        except IntegrityError:
            raise click.ClickException(
                "another process changed the same patient at the same moment; nothing was "
                "written; run the command again"
            ) from None
        except (DatabaseError, sqlite3.DatabaseError) as e:
            said = db.explain(e)
            if said is None:
                raise
            raise click.ClickException(said) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(INTERRUPTED) from None


pass_app = click.make_pass_decorator(App)


@click.group(cls=DripGroup)
@click.version_option(__version__, prog_name="drip")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """drip: timed onboarding emails for new patients of a ketamine-therapy clinic."""
    ctx.obj = ctx.obj or App()
    ctx.call_on_close(ctx.obj.close)


def main() -> None:
    cli(prog_name="drip")


# --- database ---------------------------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """The database schema."""


@db_group.command("upgrade")
@pass_app
def db_upgrade(app: App) -> None:
    """Create the schema, or bring it up to date (Alembic migrations)."""
    from drip import suppression

    db.upgrade(app.engine)
    current, _ = db.schema_revision(app.engine)
    click.echo(f"database {db.shown_url(app.engine)} is at revision {current} (newest)")
    with app.transaction() as session:
        written = suppression.backfill(session, app.settings.secret_keys)
    if written:
        click.echo(
            f"{written} address(es) suppressed before revision 0003 written to the suppression "
            "list (as keyed hashes)"
        )


# --- enrolling --------------------------------------------------------------------------------


@cli.command()
@click.argument("email", required=False)
@click.option("--campaign", required=True, help="Campaign slug, e.g. ketamine-onboarding.")
@click.option("--first-name", help="The name the patient goes by.")
@click.option("--last-name")
@click.option("--timezone", help="IANA zone, e.g. America/Chicago (default: the clinic's).")
@click.option("--first-session", help="ISO date or date-time in the patient's zone.")
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Enrol everyone in a CSV (email,first_name,last_name,timezone,first_session).",
)
@click.option(
    "--skip-invalid", is_flag=True, help="With --csv: enrol the valid rows, list the rest."
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.option(
    "--resubscribe",
    is_flag=True,
    help="Enrol a patient who unsubscribed or is suppressed: only with their consent.",
)
@click.option("--reason", help="With --resubscribe: why they may be emailed again (recorded).")
@pass_app
def enroll(
    app: App,
    email: str | None,
    campaign: str,
    first_name: str | None,
    last_name: str | None,
    timezone: str | None,
    first_session: str | None,
    csv_path: Path | None,
    skip_invalid: bool,
    as_json: bool,
    resubscribe: bool,
    reason: str | None,
) -> None:
    """Enrol one patient (EMAIL), or every row of a CSV (--csv FILE), in a campaign.

    A suppressed address (unsubscribed, bounced, `drip suppress`) is refused; with the
    patient's consent, --resubscribe --reason "…" lifts the suppression and enrols them."""
    if resubscribe and reason is None:
        raise click.UsageError(
            '--resubscribe needs --reason "…": say how the patient consented, like '
            '--reason "asked at the front desk on 2026-12-01"'
        )
    if reason is not None and not resubscribe:
        raise click.UsageError("--reason goes with --resubscribe; add it, or drop --reason")
    if csv_path is not None:
        if email or first_name or last_name or timezone or first_session:
            raise click.UsageError("give either EMAIL with its options, or --csv FILE, not both")
        if resubscribe:
            raise click.UsageError(
                "--resubscribe is for one patient at a time (each consented); "
                "give EMAIL instead of --csv"
            )
        _enroll_csv(app, csv_path, campaign, skip_invalid, as_json)
        return
    if not email:
        raise click.UsageError("give the patient's EMAIL, or --csv FILE")
    if first_name is None:
        raise click.UsageError("--first-name is required when enrolling one patient")
    fields = {
        "email": email,
        "first_name": first_name,
        "last_name": last_name or "",
        "timezone": timezone or "",
        "first_session": first_session or "",
    }
    planner = app.planner(campaign)
    checked = check_patient(fields, default_timezone=app.settings.clinic_timezone, now=planner.now)
    if isinstance(checked, list):
        raise DripError("cannot enrol:\n" + "\n".join(f"  {e}" for e in checked))
    gate = _Gate(app, checked.email, None if reason is None else check_reason(reason, "--reason"))
    counts = enrolment.enrol_retrying(
        app.transaction, planner, [checked], actor=app.actor, first=gate
    )
    if gate.reason is not None and gate.lifted is None:
        _warn("the address was not suppressed; --resubscribe changed nothing")
    if as_json:
        echo_json(
            {
                "enrolled": counts.enrolled,
                "already_enrolled": counts.already,
                "enrolment_ids": counts.enrolment_ids,
                "resubscribed": gate.lifted is not None,
            }
        )
    elif counts.enrolled:
        click.echo(
            f"enrolled in {campaign} (enrolment {counts.enrolment_ids[0]}); "
            f"see `drip timeline {checked.email}`"
        )
    else:
        click.echo(f"already enrolled in {campaign}; nothing changed")


@dataclass
class _Gate:
    """Runs in the enrolment's transaction: refuses a suppressed address, or, with a resubscribe
    reason, lifts its suppression (recorded with the actor and the reason)."""

    app: App
    email: str
    reason: str | None
    lifted: suppression.Entry | None = None

    def __call__(self, session: Session) -> None:
        keys, now = self.app.settings.secret_keys, self.app.now()
        if self.reason is None:
            suppression.refuse_if_suppressed(session, keys, self.email)
            return
        self.lifted = suppression.remove(
            session,
            keys,
            self.email,
            reason=self.reason,
            now=now,
            actor=self.app.actor,
            kind=suppression.RESUBSCRIBED,
        )


def _enroll_csv(app: App, path: Path, campaign: str, skip_invalid: bool, as_json: bool) -> None:
    try:
        _enroll_csv_file(app, path, campaign, skip_invalid, as_json)
    except DripError as e:
        if not as_json or isinstance(e, CsvError):
            raise
        # the whole file was refused before any row (no file, a bad header, not UTF-8…):
        # scripts reading --json still get JSON
        echo_json(
            {
                "rows": 0,
                "enrolled": 0,
                "already_enrolled": 0,
                "refused": 0,
                "problems": [],
                "suppressed": 0,
                "suppressed_lines": [],
                "error": str(e),
            }
        )
        raise click.exceptions.Exit(1) from None


def _enroll_csv_file(
    app: App, path: Path, campaign: str, skip_invalid: bool, as_json: bool
) -> None:
    if str(path) != "-" and not path.is_file():
        raise InputError("--csv", f"{path} does not exist or is not a file")
    planner = app.planner(campaign)
    report = csvimport.CsvReport()
    total = (lambda: csvimport.count_lines(path)) if str(path) != "-" else None
    try:
        with (
            csvimport.open_csv(path) as stream,
            _progress(total) as advance,
            app.transaction() as session,
        ):
            rows = csvimport.patients_from_csv(
                stream,
                report,
                default_timezone=app.settings.clinic_timezone,
                now=planner.now,
                skip_invalid=skip_invalid,
                suppressed=_suppressed_in(session, app.settings.secret_keys),
            )
            counts = enrolment.enrol(session, planner, rows, actor=app.actor, progress=advance)
            if report.problems and not skip_invalid:
                raise CsvError(report.problems, report.bad_rows)
    except CsvError as e:
        if not as_json:
            raise
        summary = _csv_summary(report, enrolment.EnrolCounts(), e.problems)
        echo_json(summary | {"error": e.headline})
        raise click.exceptions.Exit(1) from None
    if as_json:
        echo_json(_csv_summary(report, counts, report.problems))
        return
    for problem in report.problems:
        click.echo(f"refused {problem}", err=True)
    for left_out in report.suppressed:
        click.echo(f"left out {left_out}", err=True)
    suppressed = f"{len(report.suppressed)} suppressed, " if report.suppressed else ""
    click.echo(
        f"enrolled {counts.enrolled}, already enrolled {counts.already}, {suppressed}"
        f"refused {report.bad_rows} (of {report.rows} rows)"
    )
    if report.suppressed:
        click.echo(
            "suppressed rows were left out (unsubscribed, bounced, or `drip suppress`); "
            "`drip suppressions --email ADDRESS` says why"
        )


def _suppressed_in(session: Session, keys: tuple[str, ...]) -> csvimport.Suppressed:
    """The CSV's lookup: which of some email keys are suppressed, and since when, why."""

    def lookup(email_keys: list[str]) -> dict[str, tuple[str, datetime]]:
        found = suppression.blocked_among(session, keys, email_keys)
        return {key: (entry.reason, entry.created_at) for key, entry in found.items()}

    return lookup


def _csv_summary(
    report: csvimport.CsvReport, counts: enrolment.EnrolCounts, problems: list[RowProblem]
) -> dict[str, Any]:
    return {
        "rows": report.rows,
        "enrolled": counts.enrolled,
        "already_enrolled": counts.already,
        "refused": report.bad_rows,
        "problems": [p.__dict__ for p in problems],
        "suppressed": len(report.suppressed),
        "suppressed_lines": [s.as_json() for s in report.suppressed],
    }


@contextmanager
def _progress(total: Callable[[], int] | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal; nothing when output is piped. `total` is called only when
    the bar is shown: counting the rows reads the whole file once more before the import."""
    if not sys.stderr.isatty():
        yield lambda _n: None
        return
    from rich.progress import Progress

    with Progress(console=console(stderr=True), transient=True) as bar:
        task = bar.add_task("enrolling", total=total() if total else None)
        yield lambda n: bar.advance(task, n)


# --- one patient's plan -----------------------------------------------------------------------


@cli.command()
@click.argument("email")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def timeline(app: App, email: str, as_json: bool) -> None:
    """Every planned email of a patient: step, due time in their zone and in UTC, state."""
    loaded, broken = load_all(app.settings.templates_dir)
    with app.transaction() as session:
        patient = enrolment.find_patient(session, email)
        entries = build_timeline(session, patient, {c.slug: c for c in loaded})
        tz = patient.timezone
    for slug in sorted({e.campaign for e in entries} & set(broken)):
        _warn(f"{broken[slug]}; {slug}'s emails are listed in the order they were planned")
    if as_json:
        echo_json([e.as_json() for e in entries])
        return
    if not entries:
        click.echo("no planned emails")
        return
    table(
        ["campaign", "step", "state", f"local time ({tz})", "UTC", "note"],
        [
            [
                _campaign_label(e.campaign, e.enrolment_status),
                e.step,
                e.state,
                f"{e.local_time:%a %Y-%m-%d %H:%M %Z}" if e.local_time else "-",
                f"{e.due_at:%Y-%m-%d %H:%M}" if e.due_at else "-",
                e.note or "",
            ]
            for e in entries
        ],
    )


def _campaign_label(campaign: str, status: str) -> str:
    """A paused or ended enrolment says so beside its campaign: its rows still read `scheduled`."""
    return campaign if status == "active" else f"{campaign} ({status})"


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _change(
    app: App, email: str, campaign: str | None, change: Callable[[Session, Enrolment, Patient], T]
) -> T:
    with app.transaction() as session:
        patient = enrolment.find_patient(session, email)
        chosen = enrolment.open_enrolment(session, patient, campaign)
        return change(session, chosen, patient)


campaign_option = click.option("--campaign", help="Which enrolment, if the patient has several.")


@cli.command()
@click.argument("email")
@campaign_option
@pass_app
def pause(app: App, email: str, campaign: str | None) -> None:
    """Hold every unsent email of a patient until `drip resume`."""
    now = app.now()
    change = _change(
        app, email, campaign, lambda s, e, p: enrolment.pause(s, e, now=now, actor=app.actor)
    )
    said = "paused" if change.changed else "already paused; nothing changed"
    click.echo(said + _on_way(change.on_their_way))


@cli.command()
@click.argument("email")
@campaign_option
@pass_app
def resume(app: App, email: str, campaign: str | None) -> None:
    """Let a paused patient's emails flow again; late ones follow their step's late policy."""
    now = app.now()
    changed = _change(
        app,
        email,
        campaign,
        lambda s, e, p: enrolment.resume(
            s, e, app.planner(e.campaign, now), p.timezone, actor=app.actor
        ),
    )
    click.echo(
        "resumed; see `drip timeline` for the new times"
        if changed
        else "not paused; nothing changed"
    )


@cli.command()
@click.argument("email")
@click.option("--first-session", required=True, help="ISO date or date-time, patient's zone.")
@campaign_option
@pass_app
def reschedule(app: App, email: str, first_session: str, campaign: str | None) -> None:
    """Set or move the first session; every step not yet sent is planned again."""
    now = app.now()
    when, on_way = _change(
        app,
        email,
        campaign,
        lambda s, e, p: enrolment.reschedule(
            s, e, app.planner(e.campaign, now), p.timezone, first_session, actor=app.actor
        ),
    )
    click.echo(
        f"first session set to {when}; see `drip timeline` for the new times" + _on_way(on_way)
    )


@cli.command()
@click.argument("email")
@campaign_option
@pass_app
def unenroll(app: App, email: str, campaign: str | None) -> None:
    """End a patient's enrolment; every email not yet on its way is cancelled."""
    now = app.now()
    change = _change(
        app, email, campaign, lambda s, e, p: enrolment.unenrol(s, e, now=now, actor=app.actor)
    )
    click.echo(
        f"unenrolled; {change.cancelled} planned email(s) cancelled" + _on_way(change.on_their_way)
    )


def _on_way(count: int) -> str:
    """Emails already being handed to the mail server when a plan changed cannot be recalled."""
    if not count:
        return ""
    if count == 1:
        return "; 1 email was already on its way"
    return f"; {count} emails were already on their way"


# --- the suppression list -----------------------------------------------------------------------


def _address(email: str) -> str:
    try:
        return check_email(email)
    except InputError as e:
        raise InputError("EMAIL", e.reason) from None


@cli.command()
@click.argument("email")
@click.option(
    "--reason", default=suppression.MANUAL, show_default=True, help="Why (recorded, no names)."
)
@pass_app
def suppress(app: App, email: str, reason: str) -> None:
    """Never email this address again: on the suppression list (as a keyed hash), and if it is
    a patient's, every enrolment ended and every unsent email skipped."""
    address, why = _address(email), check_reason(reason, "--reason")
    with app.transaction() as session:
        done = suppression.add(
            session,
            app.settings.secret_keys,
            address,
            reason=why,
            source=app.actor,
            now=app.now(),
            actor=app.actor,
        )
    halted = done.halted
    said = (
        f"suppressed ({done.entry.hash_prefix})"
        if done.new
        else f"already {done.entry.describe()}; nothing changed on the list"
    )
    if done.patient_id is not None and (done.new or halted.ended_enrolments or halted.skipped):
        said += (
            f"; patient {done.patient_id}: {halted.ended_enrolments} enrolment(s) ended, "
            f"{halted.skipped} planned email(s) skipped"
        )
    click.echo(said + _on_way(halted.in_flight))


@cli.command()
@click.argument("email")
@click.option("--reason", required=True, help="Why it may be emailed again (recorded).")
@pass_app
def unsuppress(app: App, email: str, reason: str) -> None:
    """Take an address off the suppression list (the patient consented again). It enrols
    nobody: `drip enroll` next."""
    address, why = _address(email), check_reason(reason, "--reason")
    with app.transaction() as session:
        lifted = suppression.remove(
            session,
            app.settings.secret_keys,
            address,
            reason=why,
            now=app.now(),
            actor=app.actor,
        )
    if lifted is None:
        click.echo("not suppressed; nothing changed")
        return
    click.echo(
        f"no longer suppressed (was {lifted.describe()}); enrol the patient again with "
        "`drip enroll`"
    )


@cli.command()
@click.option("--email", help="Say whether this one address is suppressed, and why.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def suppressions(app: App, email: str | None, limit: int, as_json: bool) -> None:
    """The suppression list: counts by reason, then the newest entries (a hash prefix, never an
    address)."""
    keys = app.settings.secret_keys
    address = _address(email) if email is not None else None
    with app.transaction() as session:
        suppression.backfill(session, keys)
        if address is not None:
            _one_suppression(suppression.find(session, keys, address), as_json)
            return
        counts = suppression.summary(session)
        found = suppression.entries(session, limit=limit)
    total = sum(counts.values())
    if as_json:
        echo_json({"total": total, "by_reason": counts, "entries": [e.as_json() for e in found]})
        return
    if not total:
        click.echo("no address is suppressed")
        return
    click.echo(f"{total} suppressed: " + ", ".join(f"{n} {r}" for r, n in counts.items()))
    table(
        ["hash", "reason", "source", "since (UTC)"],
        [[e.hash_prefix, e.reason, e.source, f"{e.created_at:%Y-%m-%d %H:%M}"] for e in found],
    )
    if total > len(found):
        click.echo(f"(the newest {len(found)} of {total}; --limit to see more)")


def _one_suppression(entry: suppression.Entry | None, as_json: bool) -> None:
    if as_json:
        echo_json({"suppressed": entry is not None, "entry": entry and entry.as_json()})
    elif entry is None:
        click.echo("not suppressed")
    else:
        click.echo(f"{entry.describe()}, source {entry.source}, hash {entry.hash_prefix}")


# --- campaigns --------------------------------------------------------------------------------


@cli.group()
def campaigns() -> None:
    """The campaigns in DRIP_TEMPLATES_DIR."""


@campaigns.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def campaigns_list(app: App, as_json: bool) -> None:
    """Every campaign with its steps in order."""
    found, broken = load_all(app.settings.templates_dir)
    for error in broken.values():
        _warn(f"{error}; this campaign is left out (see `drip campaigns validate`)")
    if not found and not broken:
        _warn(
            f"no campaigns in {app.settings.templates_dir}; set DRIP_TEMPLATES_DIR to the folder "
            "that holds one folder per campaign (like templates/emails)"
        )
    if as_json:
        echo_json(
            [
                {"slug": c.slug, "name": c.name, "description": c.description, "steps": c.step_keys}
                for c in found
            ]
        )
        return
    table(["slug", "name", "steps"], [[c.slug, c.name, " → ".join(c.step_keys)] for c in found])


@campaigns.command("validate")
@click.argument("slug", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as a JSON list.")
@pass_app
def campaigns_validate(app: App, slug: str | None, as_json: bool) -> None:
    """Lint every campaign (or SLUG): variables, both parts of each step, subjects and preheaders,
    the footer, the HTML's size and the text's reading grade. Exit 1 on any finding."""
    from drip import lint

    report = lint.validate(app.settings, slug, now=app.now())
    if as_json:
        echo_json([finding.as_json() for finding in report.findings])
    else:
        for finding in report.findings:
            click.echo(str(finding))
    if report.findings:
        raise DripError(report.summary())
    if not as_json:
        click.echo(report.summary())


# --- looking at one email -----------------------------------------------------------------------

patient_email_option = click.option(
    "--email", help="Render it for this enrolled patient (default: a sample patient, Alex)."
)


@cli.command("preview")
@click.argument("campaign")
@click.argument("step")
@patient_email_option
@click.option(
    "--format", "fmt", type=click.Choice(["html", "text", "eml"]), default="html", show_default=True
)
@click.option("--out", type=click.Path(path_type=Path), help="Write it here.")
@click.option("--open", "open_it", is_flag=True, help="Open it (in --out, or a temporary file).")
@pass_app
def preview_email(
    app: App,
    campaign: str,
    step: str,
    email: str | None,
    fmt: str,
    out: Path | None,
    open_it: bool,
) -> None:
    """Render one email exactly as it would be sent: the HTML, the text, or the whole .eml."""
    from drip import preview

    chosen = app.campaign(campaign)
    chosen.step(step)
    who = _recipient(app, email)
    data = preview.as_format(preview.preview(app.settings, chosen, step, who, now=app.now()), fmt)
    if open_it:
        path = out or _temporary_file(preview.SUFFIXES[fmt])
        _write_out(path, data, preview.SUFFIXES[fmt])
        click.echo(f"opening {path}", err=True)
        click.launch(str(path))
    elif out is not None:
        _write_out(out, data, preview.SUFFIXES[fmt])
        click.echo(f"wrote {out} ({len(data):,} bytes)")
    else:
        click.echo(data, nl=False)  # bytes go to the binary stream as they are


@cli.command("send-test")
@click.argument("campaign")
@click.argument("step")
@click.option("--to", "to", required=True, help="Where to send it (you, not a patient).")
@patient_email_option
@pass_app
def send_test(app: App, campaign: str, step: str, to: str, email: str | None) -> None:
    """Send one email through DRIP_MAIL_URL with "[TEST] " before the subject. It is no delivery:
    only an event (`test.sent`, ids only) records it."""
    from drip import preview
    from drip.transports import open_transport

    chosen = app.campaign(campaign)
    chosen.step(step)
    with app.transaction() as session:
        who = preview.recipient(session, email)
        preview.refuse_suppressed(session, app.settings.secret_keys, to)
    with open_transport(app.settings.mail_url) as transport:
        sent = preview.send_test(app.settings, transport, chosen, step, who, to=to, now=app.now())
    with app.transaction() as session:
        preview.record_test_sent(session, chosen, step, who, now=app.now(), actor=app.actor)
    click.echo(f"sent {sent.message_id} ({campaign} / {step}) to {to}")


def _recipient(app: App, email: str | None) -> Recipient:
    """An enrolled patient (from the database) or the sample one (no database needed)."""
    from drip import preview
    from drip.messages import SAMPLE_PATIENT

    if email is None:
        return SAMPLE_PATIENT
    with app.transaction() as session:
        return preview.recipient(session, email)


def _write_out(path: Path, data: bytes, suffix: str) -> None:
    """Write --out, or say why that path cannot be written and what to give instead."""
    try:
        path.write_bytes(data)
    except IsADirectoryError:
        why = f"is a folder; give a file in it, like {path / ('preview' + suffix)}"
    except FileNotFoundError:
        why = f"cannot be written: the folder {path.parent} does not exist; create it first"
    except PermissionError:
        why = "cannot be written: permission denied; give a file in a folder you can write to"
    except OSError as e:
        why = f"cannot be written ({e.strerror}); give a file in a folder you can write to"
    else:
        return
    raise InputError("--out", f"{path} {why}")


def _temporary_file(suffix: str) -> Path:
    """A new file only this user can read: a preview may hold a patient's name."""
    fd, name = tempfile.mkstemp(prefix="drip-preview-", suffix=suffix)
    os.close(fd)
    return Path(name)


# --- operating ----------------------------------------------------------------------------------


LOG_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False)


def _celery_argv(app: App, process: str, loglevel: str) -> list[str]:
    """Logging set up before Celery starts (its first warnings are log lines too); with
    DRIP_LOG_FORMAT=json, no start-up banner: stdout and stderr then carry JSON only."""
    logs.configure(app.settings, process=process, level=loglevel.upper())
    return ["--quiet"] if app.settings.log_format == "json" else []


def metrics_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--metrics-port and --metrics-host, for `drip worker` and `drip run`."""
    command = click.option(
        "--metrics-host",
        default=METRICS_HOST,
        show_default=True,
        help="Where --metrics-port listens (0.0.0.0: every interface).",
    )(command)
    return click.option(
        "--metrics-port",
        type=click.IntRange(1, 65535),
        help="Serve this worker's Prometheus metrics (drip_sent_total…) on this port.",
    )(command)


METRICS_HOST = "127.0.0.1"


def _metrics_args(port: int | None, host: str) -> list[str]:
    if port is None:
        if host != METRICS_HOST:
            raise click.UsageError("--metrics-host needs --metrics-port")
        return []
    return [f"--metrics-port={port}", f"--metrics-host={host}"]


@cli.command()
@click.option("--concurrency", "-c", type=click.IntRange(1, 64), help="Worker processes.")
@click.option("--name", help="Node name, unique per machine (default: celery@HOST).")
@click.option("--loglevel", type=LOG_LEVELS, default="INFO", show_default=True)
@metrics_options
@pass_app
def worker(
    app: App,
    concurrency: int | None,
    name: str | None,
    loglevel: str,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """A Celery worker: sends due emails (task events on, so Flower sees it)."""
    from drip import tasks

    _metrics_args(metrics_port, metrics_host)  # refuses --metrics-host alone

    argv = [
        *_celery_argv(app, "worker", loglevel),
        "worker",
        "--events",
        f"--loglevel={loglevel}",
        f"--queues={tasks.SEND_QUEUE},{tasks.TICK_QUEUE}",
    ]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if name:
        argv.append(f"--hostname={name}@%h")
    if not app.settings.public_url.startswith("https://"):
        # a log line, not a bare one: under DRIP_LOG_FORMAT=json the worker writes JSON only
        logging.getLogger("drip.worker").warning(
            "DRIP_PUBLIC_URL=%s is not https; one-click unsubscribe (RFC 8058) needs an https "
            "link that patients can reach",
            app.settings.public_url,
        )
    if app.settings.broker_url:
        require_reachable(app.settings.broker_url)
    with broker(app.settings.broker_url, app.settings.var_dir) as url:
        db.require_current_schema(app.engine)
        app.require_clock_in_step()
        app.close()  # the worker's processes make their own connections after the fork
        exporter = _worker_exporter(app.settings, metrics_host, metrics_port)
        try:
            tasks.configure(app.settings, url, exporter, process="worker").worker_main(argv)
        finally:
            if exporter is not None:
                exporter.stop()


def _worker_exporter(settings: Settings, host: str, port: int | None) -> WorkerExporter | None:
    """The worker's metrics server (before the pool is forked), if --metrics-port asks."""
    if port is None:
        return None
    from drip.metrics import start_worker_exporter

    exporter = start_worker_exporter(settings.var_dir, host, port)
    click.echo(f"metrics: http://{_host_in_url(host)}:{port}/metrics", err=True)
    return exporter


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@cli.command()
@click.option("--loglevel", type=LOG_LEVELS, default="INFO", show_default=True)
@pass_app
def beat(app: App, loglevel: str) -> None:
    """The ticker: every DRIP_TICK_SECONDS, a worker claims what is due."""
    from drip import tasks

    quiet = _celery_argv(app, "beat", loglevel)
    app.require_clock_in_step()
    app.close()
    if app.settings.broker_url:
        require_reachable(app.settings.broker_url)
    with broker(app.settings.broker_url, app.settings.var_dir) as url:
        private_folder(app.settings.var_dir)
        celery = tasks.configure(app.settings, url, process="beat")
        celery.start([*quiet, "beat", f"--loglevel={loglevel}"])


@cli.command()
@click.option("--concurrency", "-c", type=click.IntRange(1, 64), help="Worker processes.")
@metrics_options
@pass_app
def run(app: App, concurrency: int | None, metrics_port: int | None, metrics_host: str) -> None:
    """Everything for one machine: the private Redis (unless DRIP_BROKER_URL), a worker and the
    ticker, supervised. Stops cleanly on Ctrl-C or SIGTERM. --metrics-port goes to the worker."""
    from drip.supervisor import Supervisor

    logs.configure(app.settings, process="run")
    worker_args = [f"--concurrency={concurrency}"] if concurrency else []
    worker_args += _metrics_args(metrics_port, metrics_host)
    if metrics_port is not None:  # said now, not by a worker that keeps failing to start
        from drip.metrics import check_listen

        check_listen(metrics_host, metrics_port)
    db.require_current_schema(app.engine)
    app.require_clock_in_step()
    if app.settings.broker_url:
        require_reachable(app.settings.broker_url)
    app.close()
    Supervisor(app.settings).run(worker_args)


@cli.command()
@click.option("--host", help="Address to listen on (default 127.0.0.1: behind a reverse proxy).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default 8025).")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Worker processes (default: 2 x cores + 1, at most 8).",
)
@pass_app
def serve(app: App, host: str | None, port: int | None, workers: int | None) -> None:
    """The web server (gunicorn): the unsubscribe page and one-click unsubscribe (RFC 8058),
    and /healthz. Put it behind a TLS reverse proxy; DRIP_PUBLIC_URL is its https address.
    Stops cleanly on Ctrl-C or SIGTERM."""
    from drip import server

    settings = app.settings
    app.close()  # the server makes its own engine; the workers, their own connections
    code = server.serve(settings, host=host, port=port, workers=workers, say=_say)
    if code == INTERRUPTED:
        click.echo("interrupted", err=True)
    raise click.exceptions.Exit(code)


def _say(line: str) -> None:
    click.echo(line, err=True)




@cli.command()
@click.option("--state", type=click.Choice(STATES), help="Only deliveries in this state.")
@click.option("--email", help="Only this patient's deliveries.")
@click.option("--campaign", help="Only this campaign's deliveries.")
@click.option(
    "--since",
    help="Only those changed since: a time back from now (30m, 2h, 3d) or an ISO date or "
    "instant (UTC unless it has an offset).",
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def deliveries(
    app: App,
    state: str | None,
    email: str | None,
    campaign: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Recently changed deliveries, newest first, by id (no names or addresses)."""
    now = app.now()
    since_at = _since(since, now) if since else None
    with app.transaction() as session:
        patient_id = enrolment.find_patient(session, email).id if email else None
        found = list_deliveries(
            session,
            state=state,
            patient_id=patient_id,
            campaign=campaign,
            since=since_at,
            limit=limit,
        )
    if campaign and not found and campaign not in campaign_slugs(app.settings.templates_dir):
        _warn(f"no campaign {campaign!r} in {app.settings.templates_dir} (`drip campaigns list`)")
    if as_json:
        echo_json(found)
        return
    if not found:
        click.echo("no deliveries match")
        return
    columns = ["id", "patient_id", "campaign", "step", "state", "due_at", "attempts", "last_error"]
    table(columns, [[row[c] if row[c] is not None else "" for c in columns] for row in found])


def _since(raw: str, now: datetime) -> datetime:
    """--since: a duration back from now, or an ISO date or instant."""
    try:
        return now - _positive_duration(raw)
    except ValueError:
        pass
    try:
        return parse_instant(raw)
    except ValueError:
        raise InputError(
            "--since", f"{raw!r} is neither a time back from now (30m, 2h, 3d) nor an ISO date "
            "or instant (2026-11-01, 2026-11-01T09:00Z)"
        ) from None


def _positive_duration(raw: str) -> timedelta:
    value = parse_duration(raw)
    if value <= timedelta(0) or raw.strip().startswith(("+", "-")):
        raise ValueError(raw)
    return value


@cli.command()
@click.argument("ids", nargs=-1, type=int)
@click.option(
    "--state",
    type=click.Choice([FAILED, UNKNOWN]),
    help="Every delivery in this state (instead of IDs); those that cannot go are listed.",
)
@click.option(
    "--older-than",
    help="With --state: only those that came to it longer ago than this (30m, 2h, 3d).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be retried; change nothing.")
@pass_app
def retry(
    app: App, ids: tuple[int, ...], state: str | None, older_than: str | None, dry_run: bool
) -> None:
    """Send failed or unknown deliveries again, now: IDs (all of them, or none), or every one in
    a --state. Each is recorded as your decision (an event naming you); an `unknown` one keeps
    its Message-ID, so a mail client folds a duplicate."""
    if ids and state:
        raise click.UsageError("give delivery IDs or --state, not both")
    if not ids and not state:
        raise click.UsageError("give the IDs of the deliveries to retry, or --state failed|unknown")
    if older_than and not state:
        raise click.UsageError("--older-than goes with --state")
    age = _older_than(older_than) if older_than else None
    now = app.now()
    with app.transaction() as session:
        if state:
            plan = plan_by_state(session, state, now=now, older_than=age)
        else:
            plan = plan_by_ids(session, list(ids), now=now)
            plan.require_all()
        changed = [] if dry_run else retry_deliveries(session, plan, now=now, actor=app.actor)
    _say_retried(plan, changed, dry_run, state)


def _older_than(raw: str) -> timedelta:
    try:
        return _positive_duration(raw)
    except ValueError:
        raise InputError("--older-than", f"{raw!r} is not a duration like 30m, 2h or 3d") from None


def _say_retried(plan: RetryPlan, changed: list[int], dry_run: bool, state: str | None) -> None:
    for line in plan.problems():
        _warn(f"left alone: {line}")
    if not plan.ready:
        click.echo(f"no {state or 'such'} deliveries can be retried; nothing changed")
        return
    if dry_run:
        click.echo(f"would retry {len(plan.ready)} deliveries now (--dry-run: nothing changed):")
        columns = ["id", "patient_id", "campaign", "step", "state", "last_error"]
        rows = [c.as_json() for c in plan.ready]
        table(columns, [[row[c] if row[c] is not None else "" for c in columns] for row in rows])
        return
    click.echo(f"{len(changed)} deliveries scheduled to go now")
    if len(changed) < len(plan.ready):
        click.echo(
            f"{len(plan.ready) - len(changed)} were claimed by a ticker meanwhile and go anyway"
        )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="As JSON (with --watch: a line a refresh).")
@click.option(
    "--watch",
    type=click.FloatRange(0.2, 3600),
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="Refresh every SECONDS (2 if not given) until Ctrl-C, which ends it with exit 0.",
)
@pass_app
def status(app: App, as_json: bool, watch: float | None) -> None:
    """Deliveries by state, due now and the oldest lag, sent and failed in the last hour (from
    the database); live workers, queue depth and the last tick (from Redis, which may be down:
    then only the database's figures are shown)."""
    from drip import status as status_module

    engine = db.probe_engine(app.settings.database_url)

    def gather() -> status_module.Status:
        return status_module.gather(app.settings, engine, now=app.now())

    try:
        if watch is None:
            _print_status(gather(), as_json)
        else:
            _watch_status(gather, watch, as_json)
    finally:
        engine.dispose()


def _print_status(found: Any, as_json: bool) -> None:
    from drip import status as status_module

    if as_json:
        echo_json(found.as_json())
    else:
        console().print(status_module.view(found))


def _watch_status(gather: Callable[[], Any], seconds: float, as_json: bool) -> None:
    """Until Ctrl-C: in place on a terminal (rich Live), one snapshot after another when piped,
    one JSON object a line with --json. A database that stops answering is shown, not fatal:
    the next refresh tries again. Ctrl-C is how a watch ends, so it exits 0."""
    from rich.live import Live

    from drip import status as status_module

    out = console()
    try:
        if as_json or not out.is_terminal:
            while True:
                _snapshot(gather, as_json, out)
                time.sleep(seconds)
        from rich.console import Group
        from rich.text import Text

        hint = Text(f"every {seconds:g} s; Ctrl-C to stop", style="dim")
        with Live(console=out, auto_refresh=False) as live:
            while True:
                shown = _watched(gather, status_module.view)
                live.update(Group(shown, hint), refresh=True)
                time.sleep(seconds)
    except KeyboardInterrupt:
        return


def _snapshot(gather: Callable[[], Any], as_json: bool, out: Any) -> None:
    from drip import status as status_module

    try:
        found = gather()
    except DripError as e:
        if as_json:
            click.echo(json.dumps({"error": str(e)}), nl=True)
        else:
            out.print(plain(f"error: {e}"), style="bold red")
        return
    if as_json:
        click.echo(json.dumps(found.as_json(), ensure_ascii=False))
    else:
        out.print(status_module.view(found))
        out.line()


def _watched(gather: Callable[[], Any], view: Callable[[Any], Any]) -> Any:
    try:
        return view(gather())
    except DripError as e:
        return plain(f"error: {e}\n(trying again)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON list: one object per finding.")
@pass_app
def doctor(app: App, as_json: bool) -> None:
    """Check the installation: the database and its schema, the clocks, patients' time zones,
    Redis, the workers and the ticker, the mail server (EHLO, STARTTLS, AUTH; nothing is sent),
    DRIP_SECRET_KEY, DRIP_PUBLIC_URL, the send window, the campaigns and file permissions.
    Each problem on one line with its fix; exit 1 if any (warnings alone: exit 0)."""
    from drip import doctor as checks

    context = checks.Context(app.settings, now=app.now())
    try:
        results = checks.run(context)
    finally:
        context.close()
    if as_json:
        echo_json([result.as_json() for result in results])
    else:
        _print_findings(results)
    if any(result.severity == checks.ERROR for result in results):
        if not as_json:
            click.echo(f"{checks.summary(results)}: fix them and run `drip doctor` again", err=True)
        raise click.exceptions.Exit(1)
    if not as_json:
        click.echo(checks.summary(results))


SEVERITY_STYLES = {"ok": "green", "warning": "yellow", "error": "bold red", "skipped": "dim"}


def _print_findings(results: list[Any]) -> None:
    """One line each, never wrapped (a problem and its fix stay on their line)."""
    from rich.text import Text

    out = console()
    for result in results:
        line = Text(f"{result.severity:<8}", style=SEVERITY_STYLES[result.severity])
        line.append(plain(f" {result}"))
        out.print(line, soft_wrap=True)


@cli.command()
@click.option("--patients", type=click.IntRange(1, 50), default=4, show_default=True)
def demo(patients: int) -> None:
    """The whole pipeline on embedded defaults, the campaign's weeks played in about a minute.

    Everything lives under var/demo/: a SQLite database, a private Redis, and the emails as
    .eml and .html files."""
    from drip.demo import Demo

    Demo(Path("var/demo"), patients=patients).run()


if __name__ == "__main__":
    main()
