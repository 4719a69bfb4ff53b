"""Planning: when each step of a campaign falls due for one patient.

Pure functions of their arguments (no database, no clock): the caller passes `now`. Local times are
the patient's, through zoneinfo, so DST shifts are handled: a wall-clock time that does not exist
(spring forward) moves forward by the gap; one that happens twice (fall back) takes the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import TYPE_CHECKING

from drip.durations import parse_clock_time

if TYPE_CHECKING:
    from drip.campaigns import Step


def local_to_utc(day: date, at: time, zone: tzinfo) -> datetime:
    """The instant a wall clock in `zone` shows `at` on `day` (fold=0 for DST edge cases)."""
    return datetime.combine(day, at, tzinfo=zone).astimezone(UTC)


@dataclass(frozen=True)
class SendWindow:
    """The local hours when email may leave, e.g. 09:00-19:00; 00:00-24:00 means always."""

    start: int  # minutes after local midnight
    end: int  # minutes after local midnight, up to 1440

    @classmethod
    def parse(cls, text: str) -> SendWindow:
        try:
            first, last = text.strip().split("-")
            start = parse_clock_time(first)
            end_minutes = 1440 if last.strip() == "24:00" else _minutes(parse_clock_time(last))
        except ValueError:
            raise ValueError(
                "use local hours like 09:00-19:00 (00:00-24:00 means always)"
            ) from None
        if end_minutes <= _minutes(start):
            raise ValueError(
                "the window must end after it starts on the same day, e.g. 09:00-19:00"
            )
        return cls(_minutes(start), end_minutes)

    @property
    def always(self) -> bool:
        return self.start == 0 and self.end == 1440

    @property
    def opens(self) -> time:
        """The local time of day the window opens."""
        return time(self.start // 60, self.start % 60)

    def __str__(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"

    def contains(self, instant: datetime, zone: tzinfo) -> bool:
        if self.always:
            return True
        local = instant.astimezone(zone)
        return self.start <= local.hour * 60 + local.minute < self.end

    def next_open(self, instant: datetime, zone: tzinfo) -> datetime:
        """`instant` if the window is open then, else the next moment it opens."""
        if self.contains(instant, zone):
            return instant
        local = instant.astimezone(zone)
        day = local.date()
        if local.hour * 60 + local.minute >= self.end:
            day += timedelta(days=1)
        return local_to_utc(day, self.opens, zone)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _minutes(t: time) -> int:
    return t.hour * 60 + t.minute


@dataclass(frozen=True)
class FirstSession:
    """The patient's first treatment session: a local date, and a local time if known."""

    on: date
    at: time | None = None

    def __str__(self) -> str:
        return self.on.isoformat() + (f" {self.at:%H:%M}" if self.at else "")


@dataclass(frozen=True)
class Plan:
    """When one step is due (UTC), or that it is not: waiting for a date (`due_at` None), or
    stale (too late for its late policy). `expires_at`: the step's last useful instant, kept so
    that a row that waits (workers down, retries) is skipped at send time too."""

    due_at: datetime | None
    expires_at: datetime | None = None
    stale: bool = False


WAITING = Plan(None)


def plan_step(
    step: Step,
    *,
    zone: tzinfo,
    enrolled_at: datetime,
    first_session: FirstSession | None,
    window: SendWindow,
    now: datetime,
    earliest: datetime | None = None,
) -> Plan:
    """Due time of `step` for one patient (not before `earliest`), following its late policy
    when it is already late."""
    nominal = _nominal(step, zone, enrolled_at, first_session, window)
    if nominal is None:
        return WAITING
    expires = nominal + step.skip_after if step.late == "skip" and step.skip_after else None
    due = window.next_open(max(nominal, now, earliest or nominal), zone)
    return Plan(due, expires, stale=expires is not None and due > expires)


def plan_steps(
    steps: Sequence[Step],
    *,
    zone: tzinfo,
    enrolled_at: datetime,
    first_session: FirstSession | None,
    window: SendWindow,
    now: datetime,
    gap: timedelta,
) -> list[Plan]:
    """Every step's plan, in step order, spaced so that no two of them fall closer than `gap`
    (DRIP_MIN_GAP): in the order they fall due (step order for a tie), each takes the first
    moment from its own due time on that is at least `gap` from every step already placed
    (inside the send window). If that would make a step that is useless when late ("getting
    ready for your first visit", `late = "skip"`) stale, those steps are placed first instead,
    and the ones that may wait move: spacing never loses a time-critical email."""

    def plan(step: Step, earliest: datetime | None = None) -> Plan:
        return plan_step(
            step,
            zone=zone,
            enrolled_at=enrolled_at,
            first_session=first_session,
            window=window,
            now=now,
            earliest=earliest,
        )

    unspaced = [plan(step) for step in steps]
    timed = [i for i, p in enumerate(unspaced) if p.due_at is not None and not p.stale]

    def spaced(order: list[int]) -> list[Plan]:
        plans, placed = list(unspaced), list[datetime]()
        for i in order:
            due, step = plans[i].due_at, steps[i]
            assert due is not None

            def in_window(t: datetime, step: Step = step) -> datetime | None:
                return plan(step, t).due_at

            free = _first_free(due, placed, gap, in_window)
            if free != due:
                plans[i] = plan(step, free)
            moved = plans[i].due_at
            if not plans[i].stale and moved is not None:
                placed.append(moved)
        return plans

    in_order = spaced(sorted(timed, key=lambda i: (unspaced[i].due_at, i)))
    if not any(in_order[i].stale for i in timed):
        return in_order
    return spaced(sorted(timed, key=lambda i: (steps[i].late != "skip", unspaced[i].due_at, i)))


def _first_free(
    due: datetime,
    placed: list[datetime],
    gap: timedelta,
    reschedule: Callable[[datetime], datetime | None],
) -> datetime:
    """The first instant from `due` on that is at least `gap` from every instant in `placed`,
    as `reschedule` (the send window) allows."""
    candidate = due
    for _ in range(len(placed) + 1):
        clash = [t for t in placed if abs(candidate - t) < gap]
        if not clash:
            return candidate
        moved = reschedule(max(clash) + gap)
        assert moved is not None
        candidate = moved
    return candidate


def _nominal(
    step: Step,
    zone: tzinfo,
    enrolled_at: datetime,
    first_session: FirstSession | None,
    window: SendWindow,
) -> datetime | None:
    """The instant the campaign asks for, before the send window and lateness are applied."""
    if step.anchor == "enrolled":
        anchor = enrolled_at.astimezone(zone)
    elif first_session is None:
        return None
    else:
        at = first_session.at or window.opens
        anchor = local_to_utc(first_session.on, at, zone).astimezone(zone)
    if step.send_at is None:
        return anchor.astimezone(UTC) + step.offset
    return local_to_utc(anchor.date() + step.offset, step.send_at, zone)
