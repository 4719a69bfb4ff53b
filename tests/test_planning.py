from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from drip.campaigns import Step
from drip.durations import parse_clock_time, parse_duration
from drip.planning import FirstSession, SendWindow, plan_step

NY = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
WINDOW = SendWindow.parse("09:00-19:00")
STEP = Step(
    key="s",
    anchor="enrolled",
    offset=timedelta(days=1),
    send_at=time(10, 0),
    late="send",
    skip_after=None,
    subject="x",
    preheader="",
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def plan(
    step: Step = STEP,
    *,
    zone: ZoneInfo = NY,
    enrolled: datetime,
    now: datetime | None = None,
    first: FirstSession | None = None,
    window: SendWindow = WINDOW,
):
    return plan_step(
        step,
        zone=zone,
        enrolled_at=enrolled,
        first_session=first,
        window=window,
        now=now or enrolled,
    )


def test_offset_in_days_lands_on_the_local_send_time_of_that_day() -> None:
    # Enrolled Wed 2026-06-10 15:00 New York (EDT, UTC-4); +1d at 10:00 → Thu 10:00 EDT.
    result = plan(enrolled=utc(2026, 6, 10, 19, 0))
    assert not result.stale
    assert result.due_at == utc(2026, 6, 11, 14, 0)


def test_the_same_step_differs_in_utc_by_the_patients_zone() -> None:
    enrolled = utc(2026, 6, 10, 12, 0)
    ny = plan(enrolled=enrolled, zone=NY).due_at
    la = plan(enrolled=enrolled, zone=ZoneInfo("America/Los_Angeles")).due_at
    assert ny is not None and la is not None
    assert la - ny == timedelta(hours=3)
    assert la.astimezone(ZoneInfo("America/Los_Angeles")).time() == time(10, 0)


def test_a_step_without_send_time_goes_at_the_anchor_plus_offset_inside_the_window() -> None:
    welcome = replace(STEP, offset=timedelta(0), send_at=None)
    assert plan(welcome, enrolled=utc(2026, 6, 10, 15, 30)).due_at == utc(2026, 6, 10, 15, 30)


def test_before_the_window_opens_moves_to_the_opening_the_same_day() -> None:
    welcome = replace(STEP, offset=timedelta(0), send_at=None)
    # 06:30 EDT → 09:00 EDT the same day.
    assert plan(welcome, enrolled=utc(2026, 6, 10, 10, 30)).due_at == utc(2026, 6, 10, 13, 0)


def test_after_the_window_closes_moves_to_the_next_days_opening() -> None:
    welcome = replace(STEP, offset=timedelta(0), send_at=None)
    # 20:00 EDT → 09:00 EDT next day; 19:00 exactly is already closed.
    assert plan(welcome, enrolled=utc(2026, 6, 11, 0, 0)).due_at == utc(2026, 6, 11, 13, 0)
    assert plan(welcome, enrolled=utc(2026, 6, 10, 23, 0)).due_at == utc(2026, 6, 11, 13, 0)


def test_a_send_time_outside_the_window_is_moved_into_it() -> None:
    early = replace(STEP, send_at=time(7, 0))
    assert plan(early, enrolled=utc(2026, 6, 10, 19, 0)).due_at == utc(2026, 6, 11, 13, 0)


def test_an_always_open_window_never_moves_anything() -> None:
    night = replace(STEP, send_at=time(3, 0))
    always = SendWindow.parse("00:00-24:00")
    assert always.always
    assert plan(night, enrolled=utc(2026, 6, 10, 19, 0), window=always).due_at == utc(
        2026, 6, 11, 7, 0
    )


def test_dst_end_in_new_york_keeps_the_local_send_time() -> None:
    # Sat 2026-10-31 (EDT, UTC-4) +1d → Sun 2026-11-01, the day clocks fall back (EST, UTC-5).
    result = plan(enrolled=utc(2026, 10, 31, 16, 0))
    assert result.due_at == utc(2026, 11, 1, 15, 0)
    assert result.due_at.astimezone(NY).time() == time(10, 0)
    # and the day before it, still EDT
    assert plan(enrolled=utc(2026, 10, 30, 16, 0)).due_at == utc(2026, 10, 31, 14, 0)


def test_dst_start_in_london_keeps_the_local_send_time() -> None:
    # Sat 2026-03-28 (GMT) +1d → Sun 2026-03-29, the day clocks spring forward (BST, UTC+1).
    result = plan(enrolled=utc(2026, 3, 28, 12, 0), zone=LONDON)
    assert result.due_at == utc(2026, 3, 29, 9, 0)
    assert result.due_at.astimezone(LONDON).time() == time(10, 0)
    assert plan(enrolled=utc(2026, 3, 27, 12, 0), zone=LONDON).due_at == utc(2026, 3, 28, 10, 0)


def test_a_local_time_skipped_by_dst_moves_forward_by_the_gap() -> None:
    # 01:30 does not exist in London on 2026-03-29; it becomes 02:30 BST.
    gap = replace(STEP, send_at=time(1, 30))
    always = SendWindow.parse("00:00-24:00")
    due = plan(gap, zone=LONDON, enrolled=utc(2026, 3, 28, 12, 0), window=always).due_at
    assert due == utc(2026, 3, 29, 1, 30)
    assert due.astimezone(LONDON).time() == time(2, 30)


def test_a_local_time_repeated_by_dst_takes_the_first() -> None:
    # 01:30 happens twice in New York on 2026-11-01: first in EDT (05:30 UTC).
    twice = replace(STEP, send_at=time(1, 30))
    always = SendWindow.parse("00:00-24:00")
    assert plan(twice, enrolled=utc(2026, 10, 31, 16, 0), window=always).due_at == utc(
        2026, 11, 1, 5, 30
    )


def test_window_opening_on_a_dst_day_is_the_local_opening() -> None:
    welcome = replace(STEP, offset=timedelta(0), send_at=None)
    # 2026-11-01 05:00 EST (10:00 UTC) → opens 09:00 EST = 14:00 UTC.
    assert plan(welcome, enrolled=utc(2026, 11, 1, 10, 0)).due_at == utc(2026, 11, 1, 14, 0)


FIRST = FirstSession(date(2026, 6, 20), time(15, 0))
BEFORE = replace(
    STEP,
    anchor="first_session",
    offset=timedelta(days=-2),
    late="skip",
    skip_after=timedelta(hours=36),
)


def test_first_session_steps_wait_until_a_date_is_known() -> None:
    result = plan(BEFORE, enrolled=utc(2026, 6, 10, 15, 0))
    assert not result.stale and result.due_at is None


def test_first_session_steps_are_anchored_to_its_local_date() -> None:
    result = plan(BEFORE, enrolled=utc(2026, 6, 10, 15, 0), first=FIRST)
    assert result.due_at == utc(2026, 6, 18, 14, 0)


def test_a_first_session_without_time_anchors_at_the_window_opening() -> None:
    after = replace(STEP, anchor="first_session", offset=timedelta(hours=2), send_at=None)
    result = plan(after, enrolled=utc(2026, 6, 10, 15, 0), first=FirstSession(date(2026, 6, 20)))
    assert result.due_at == utc(2026, 6, 20, 15, 0)  # 09:00 EDT + 2h


def test_a_late_step_with_send_policy_goes_at_the_next_open_moment() -> None:
    # Enrolled 2026-06-19 16:00 EDT: "2 days before" (06-18 10:00) is already past.
    late = replace(BEFORE, late="send", skip_after=None)
    now = utc(2026, 6, 19, 20, 0)
    assert plan(late, enrolled=now, first=FIRST).due_at == now
    # after hours: next morning
    evening = utc(2026, 6, 19, 23, 30)
    assert plan(late, enrolled=evening, first=FIRST).due_at == utc(2026, 6, 20, 13, 0)


def test_a_late_step_with_skip_policy_still_goes_within_its_stated_age() -> None:
    now = utc(2026, 6, 18, 20, 0)  # 10 h after the planned 10:00 EDT
    result = plan(BEFORE, enrolled=now, first=FIRST)
    assert not result.stale and result.due_at == now


def test_a_late_step_with_skip_policy_is_skipped_once_too_old() -> None:
    now = utc(2026, 6, 20, 2, 0)  # 36 h + 2 h after the planned time
    result = plan(BEFORE, enrolled=now, first=FIRST)
    assert result.stale


def test_skip_policy_counts_the_wait_for_the_window() -> None:
    # 34 h late at 20:00 EDT, and the window opens 13 h later: 47 h > 36 h, so skipped.
    now = utc(2026, 6, 20, 0, 0)  # 2026-06-19 20:00 EDT
    result = plan(BEFORE, enrolled=now, first=FIRST)
    assert result.stale


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+1d", timedelta(days=1)),
        ("-2d", timedelta(days=-2)),
        ("36h", timedelta(hours=36)),
        ("1d12h", timedelta(hours=36)),
        ("0d", timedelta(0)),
        ("90m", timedelta(minutes=90)),
    ],
)
def test_durations_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "d", "1w", "1.5d", "+-1d", "10"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["9", "25:00", "10:60", "10.30", "ten"])
def test_bad_clock_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="time of day"):
        parse_clock_time(text)


@pytest.mark.parametrize("text", ["19:00-09:00", "09:00", "9-5", "09:00-09:00", "00:00-25:00"])
def test_bad_send_windows_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="09:00-19:00"):
        SendWindow.parse(text)


def test_send_window_prints_as_it_was_written() -> None:
    assert str(SendWindow.parse("08:30-20:00")) == "08:30-20:00"
    assert str(SendWindow.parse("00:00-24:00")) == "00:00-24:00"


def test_steps_that_would_fall_closer_than_the_minimum_gap_are_spaced_by_it() -> None:
    """Enrolled Mon 2026-11-02 with the first visit on Thu 11-05: "treatment-plan" (enrolled +1d
    at 10:00) and "before-first-session" (visit -2d at 10:00) would land in the same minute."""
    from drip.campaigns import load_campaign
    from drip.planning import plan_steps
    from drip.settings import Settings

    campaign = load_campaign(Settings().templates_dir, "ketamine-onboarding")
    zone = ZoneInfo("America/New_York")
    enrolled = utc(2026, 11, 2, 15, 0)  # 10:00 EST
    kwargs = {
        "zone": zone,
        "enrolled_at": enrolled,
        "first_session": FirstSession(date(2026, 11, 5), time(11, 0)),
        "window": WINDOW,
        "now": enrolled,
    }
    unspaced = plan_steps(campaign.steps, gap=timedelta(0), **kwargs)  # type: ignore[arg-type]
    spaced = plan_steps(campaign.steps, gap=timedelta(hours=12), **kwargs)  # type: ignore[arg-type]
    keys = campaign.step_keys
    at = {k: p.due_at for k, p in zip(keys, unspaced, strict=True)}
    assert at["treatment-plan"] == at["before-first-session"]  # the collision, without a gap
    times = sorted(p.due_at for p in spaced if p.due_at is not None and not p.stale)
    assert all(b - a >= timedelta(hours=12) for a, b in zip(times, times[1:], strict=False))
    moved = dict(zip(keys, spaced, strict=True))["before-first-session"]
    assert moved.due_at is not None and moved.due_at.astimezone(zone).hour >= 9  # in the window
    assert not moved.stale and moved.expires_at is not None and moved.due_at <= moved.expires_at


@pytest.mark.parametrize(
    ("zone_name", "days_ahead"),
    [("Asia/Tokyo", 2), ("Asia/Tokyo", 3), ("Asia/Tokyo", 4), ("Pacific/Auckland", 3),
     ("America/Chicago", 3), ("America/New_York", 2)],
)  # fmt: skip
def test_spacing_never_makes_the_first_visit_email_stale(zone_name: str, days_ahead: int) -> None:
    """Found by trying it: a patient ahead of the clinic's zone with a visit 2-4 days out lost
    "getting ready for your first visit" to the enrolment emails that could have waited."""
    from drip.campaigns import load_campaign
    from drip.planning import plan_steps
    from drip.settings import Settings

    campaign = load_campaign(Settings().templates_dir, "ketamine-onboarding")
    zone = ZoneInfo(zone_name)
    enrolled = utc(2026, 12, 1, 10, 0)
    visit = (enrolled.astimezone(zone) + timedelta(days=days_ahead)).date()
    kwargs = {
        "zone": zone,
        "enrolled_at": enrolled,
        "first_session": FirstSession(visit, time(14, 30)),
        "window": WINDOW,
        "now": enrolled,
    }
    unspaced = plan_steps(campaign.steps, gap=timedelta(0), **kwargs)  # type: ignore[arg-type]
    spaced = plan_steps(campaign.steps, gap=timedelta(hours=12), **kwargs)  # type: ignore[arg-type]
    for before, after in zip(unspaced, spaced, strict=True):
        assert before.stale or not after.stale  # spacing makes nothing stale
    times = sorted(p.due_at for p in spaced if p.due_at is not None and not p.stale)
    assert all(b - a >= timedelta(hours=12) for a, b in zip(times, times[1:], strict=False))
