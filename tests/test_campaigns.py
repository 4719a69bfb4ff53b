from __future__ import annotations

from datetime import time, timedelta
from pathlib import Path

import pytest

from drip.campaigns import load_all, load_campaign
from drip.errors import CampaignError, NotFound
from drip.settings import PROJECT_ROOT

TEMPLATES = PROJECT_ROOT / "templates" / "emails"


def test_the_shipped_campaign_loads_with_its_steps_in_order() -> None:
    campaign = load_campaign(TEMPLATES, "ketamine-onboarding")
    assert campaign.step_keys == [
        "welcome",
        "treatment-plan",
        "medications",
        "before-first-session",
        "after-first-session",
        "insurance",
        "check-in",
        "after-series",
    ]
    before = campaign.step("before-first-session")
    assert before.anchor == "first_session" and before.offset == timedelta(days=-2)
    assert before.send_at == time(10, 0) and before.late == "skip"
    assert [c.slug for c in load_all(TEMPLATES)] == ["ketamine-onboarding"]


def test_an_unknown_campaign_names_the_ones_that_exist() -> None:
    with pytest.raises(NotFound, match="ketamine-onboarding"):
        load_campaign(TEMPLATES, "onboarding")


def test_an_unknown_step_names_the_steps() -> None:
    with pytest.raises(NotFound, match="welcome"):
        load_campaign(TEMPLATES, "ketamine-onboarding").step("hello")


def write(tmp_path: Path, body: str) -> Path:
    folder = tmp_path / "c"
    folder.mkdir(exist_ok=True)
    (folder / "campaign.toml").write_text(body)
    return tmp_path


STEP = '[[steps]]\nkey = "a"\nsubject = "Hi"\n'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name = ", "not valid TOML"),
        ('name = "x"', "no [[steps]]"),
        (STEP + 'anchor = "birthday"', "anchor must be"),
        (STEP + 'offset = "soon"', "duration"),
        (STEP + 'offset = "+1d2h"\nsend_at = "10:00"', "whole days"),
        (STEP + 'send_at = "25:00"', "time of day"),
        (STEP + 'late = "skip"', "needs skip_after"),
        (STEP + 'late = "maybe"', "late must be"),
        (STEP + 'colour = "red"', "unknown field"),
        ('[[steps]]\nkey = "A b"\nsubject = "x"', "lowercase"),
        ('[[steps]]\nkey = "a"', "needs a subject"),
        (STEP + STEP, "repeat"),
    ],
)
def test_a_broken_campaign_says_what_and_where(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(CampaignError) as caught:
        load_campaign(write(tmp_path, body), "c")
    assert message in str(caught.value) and "campaign.toml" in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", '"""\nHello\nthere\n"""'),
        ("subject", '"Hi\\r\\nBcc: all@example.com"'),
        ("preheader", '"""\nWhat to bring\nand when\n"""'),
    ],
)
def test_a_subject_or_preheader_on_more_than_one_line_is_refused_when_loaded(
    tmp_path: Path, field: str, value: str
) -> None:
    """Refused here, once, rather than by the message builder for every email of the step."""
    body = STEP if field == "preheader" else '[[steps]]\nkey = "a"\n'
    body += f"{field} = {value}\n"
    with pytest.raises(CampaignError) as caught:
        load_campaign(write(tmp_path, body), "c")
    message = str(caught.value)
    assert "campaign.toml: step 'a'" in message and f"the {field}" in message
    assert "more than one line" in message and f'{field} = "…"' in message


def test_a_multi_line_string_that_is_one_line_once_trimmed_is_accepted(tmp_path: Path) -> None:
    (step,) = load_campaign(write(tmp_path, STEP.replace('"Hi"', '"""\nHi\n"""')), "c").steps
    assert step.subject == "Hi"


def test_a_control_character_in_the_subject_is_refused_when_loaded(tmp_path: Path) -> None:
    body = '[[steps]]\nkey = "a"\nsubject = "Hi\\u000bthere"\n'
    with pytest.raises(CampaignError, match="control character"):
        load_campaign(write(tmp_path, body), "c")
