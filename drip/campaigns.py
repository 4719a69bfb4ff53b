"""Campaigns: a folder `templates/emails/<slug>/` with campaign.toml and one template pair per step.

campaign.toml:

    name = "Ketamine therapy onboarding"
    description = "…"

    [[steps]]
    key = "before-first-session"
    anchor = "first_session"      # or "enrolled"
    offset = "-2d"                # whole days when send_at is given; any duration otherwise
    send_at = "10:00"             # local time; leave out to send at the anchor + offset
    late = "skip"                 # "send": send late; "skip": skip once more than skip_after late
    skip_after = "36h"
    subject = "Your first visit is coming up"
    preheader = "What the day looks like, and how to get ready"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from datetime import time, timedelta
from pathlib import Path
from typing import Any, Literal

from drip import headers
from drip.durations import parse_clock_time, parse_duration
from drip.errors import CampaignError, NotFound

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
STEP_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ANCHORS = ("enrolled", "first_session")
STEP_FIELDS = {"key", "anchor", "offset", "send_at", "late", "skip_after", "subject", "preheader"}


@dataclass(frozen=True)
class Step:
    """One planned email of a campaign."""

    key: str
    anchor: Literal["enrolled", "first_session"]
    offset: timedelta
    send_at: time | None
    late: Literal["send", "skip"]
    skip_after: timedelta | None
    subject: str
    preheader: str


@dataclass(frozen=True)
class Campaign:
    """A sequence of steps, loaded from its folder."""

    slug: str
    name: str
    description: str
    steps: tuple[Step, ...]
    path: Path

    def step(self, key: str) -> Step:
        for step in self.steps:
            if step.key == key:
                return step
        known = ", ".join(s.key for s in self.steps)
        raise NotFound(f"campaign {self.slug!r} has no step {key!r}; its steps are: {known}")

    @property
    def step_keys(self) -> list[str]:
        return [s.key for s in self.steps]


def campaign_slugs(templates_dir: Path) -> list[str]:
    if not templates_dir.is_dir():
        return []
    return sorted(p.name for p in templates_dir.iterdir() if (p / "campaign.toml").is_file())


def load_campaign(templates_dir: Path, slug: str) -> Campaign:
    """Load and check one campaign; NotFound names the campaigns that do exist."""
    folder = templates_dir / slug
    if not SLUG.match(slug) or not (folder / "campaign.toml").is_file():
        known = ", ".join(campaign_slugs(templates_dir)) or "none"
        raise NotFound(
            f"no campaign {slug!r} in {templates_dir}; campaigns there: {known} "
            "(see `drip campaigns list`)"
        )
    source = folder / "campaign.toml"
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CampaignError(f"{source}: not valid TOML: {e}") from None
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise CampaignError(f"{source}: no [[steps]]; a campaign needs at least one step")
    parsed = tuple(_step(source, i, raw) for i, raw in enumerate(steps, 1))
    keys = [s.key for s in parsed]
    if len(set(keys)) != len(keys):
        raise CampaignError(f"{source}: step keys repeat: {keys}; each key must be unique")
    return Campaign(
        slug=slug,
        name=str(data.get("name", slug)),
        description=str(data.get("description", "")),
        steps=parsed,
        path=folder,
    )


def load_all(templates_dir: Path) -> tuple[list[Campaign], dict[str, CampaignError]]:
    """Every campaign that loads, and by slug the error of each that does not: one broken
    folder must not hide the others."""
    loaded, broken = [], {}
    for slug in campaign_slugs(templates_dir):
        try:
            loaded.append(load_campaign(templates_dir, slug))
        except CampaignError as e:
            broken[slug] = e
    return loaded, broken


def _step(source: Path, index: int, raw: Any) -> Step:
    where = f"{source}: step {index}"
    if not isinstance(raw, dict):
        raise CampaignError(f"{where}: must be a table ([[steps]])")
    unknown = set(raw) - STEP_FIELDS
    if unknown:
        raise CampaignError(
            f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(STEP_FIELDS)}"
        )
    key = str(raw.get("key", ""))
    if not STEP_KEY.match(key):
        raise CampaignError(f"{where}: key {key!r} must be lowercase letters, digits, - or _")
    where = f"{source}: step {key!r}"
    anchor = raw.get("anchor", "enrolled")
    if anchor not in ANCHORS:
        raise CampaignError(f"{where}: anchor must be one of {ANCHORS}, not {anchor!r}")
    try:
        offset = parse_duration(str(raw.get("offset", "0d")))
        send_at = parse_clock_time(str(raw["send_at"])) if "send_at" in raw else None
        skip_after = parse_duration(str(raw["skip_after"])) if "skip_after" in raw else None
    except ValueError as e:
        raise CampaignError(f"{where}: {e}") from None
    if send_at is not None and offset % timedelta(days=1):
        raise CampaignError(f"{where}: with send_at, offset must be whole days (like -2d)")
    late = raw.get("late", "send")
    if late not in ("send", "skip"):
        raise CampaignError(f"{where}: late must be 'send' or 'skip', not {late!r}")
    if late == "skip" and (skip_after is None or skip_after < timedelta(0)):
        raise CampaignError(f"{where}: late = 'skip' needs skip_after, e.g. skip_after = '36h'")
    # spaces at the ends are dropped; a line break there is refused below, not dropped
    subject = str(raw.get("subject", "")).strip(" ")
    if not subject:
        raise CampaignError(f"{where}: needs a subject")
    preheader = str(raw.get("preheader", "")).strip(" ")
    for name, value in (("subject", subject), ("preheader", preheader)):
        _one_line(where, name, value)
    return Step(
        key=key,
        anchor=anchor,
        offset=offset,
        send_at=send_at,
        late=late,
        skip_after=skip_after,
        subject=subject,
        preheader=preheader,
    )


def _one_line(where: str, name: str, value: str) -> None:
    """Refuse here, where the campaign is loaded, what would break a header (drip.headers): the
    subject goes into every email's Subject, and the preheader is the one line an inbox shows
    after it. Caught later, a subject would fail every email of the step when it is built, not
    once when the campaign is read. A line break at the end (a multi-line string) is refused
    too: what a campaign says goes out as written, or not at all."""
    if "\n" in value or "\r" in value:
        raise CampaignError(
            f"{where}: the {name} {value!r} spans more than one line; write it on one line, "
            f'like {name} = "…", not as a multi-line """…""" string'
        )
    found = headers.problem(value)
    if found and (name == "subject" or headers.ENCODED_WORD_START not in found):
        raise CampaignError(f"{where}: the {name} {found}; remove it")
