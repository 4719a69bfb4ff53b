from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import time, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from drip.campaigns import load_all, load_campaign
from drip.cli import App, cli
from drip.errors import CampaignError, NotFound
from drip.settings import PROJECT_ROOT
from tests.conftest import TEST_SECRET

TEMPLATES = PROJECT_ROOT / "templates" / "emails"
CAMPAIGN = "ketamine-onboarding"
Drip = Callable[..., Result]


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
    assert [c.slug for c in load_all(TEMPLATES)[0]] == ["ketamine-onboarding"]


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


def test_a_multi_line_string_ending_in_a_line_break_is_refused_not_trimmed(
    tmp_path: Path,
) -> None:
    """A subject goes out as written or not at all: a trailing line break is not dropped."""
    with pytest.raises(CampaignError, match="more than one line"):
        load_campaign(write(tmp_path, STEP.replace('"Hi"', '"""\nHi\n"""')), "c")


def test_spaces_around_a_subject_are_trimmed(tmp_path: Path) -> None:
    (step,) = load_campaign(write(tmp_path, STEP.replace('"Hi"', '"  Hi  "')), "c").steps
    assert step.subject == "Hi"


def test_a_control_character_in_the_subject_is_refused_when_loaded(tmp_path: Path) -> None:
    body = '[[steps]]\nkey = "a"\nsubject = "Hi\\u000bthere"\n'
    with pytest.raises(CampaignError, match="control character, U\\+000B"):
        load_campaign(write(tmp_path, body), "c")


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("subject", r"Hi\r\nBcc: a@evil.example", "more than one line"),
        ("subject", r"Hi\n", "more than one line"),
        ("subject", r"Hi\u0085Bcc: a@evil.example", "U+0085 (NEXT LINE)"),
        ("subject", r"Hi\u2028Bcc: a@evil.example", "U+2028 (LINE SEPARATOR)"),
        ("subject", r"Hi\u2029", "U+2029 (PARAGRAPH SEPARATOR)"),
        ("subject", r"Hi\u0000", "U+0000 (NUL)"),
        ("subject", r"Hi\u0009there", "U+0009 (TAB)"),
        ("subject", "=?utf-8?q?x=0D=0ABcc:_a@evil.example?=", "encoded word"),
        ("subject", "=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?=", "encoded word"),
        ("preheader", r"What to bring\u2028Bcc", "U+2028 (LINE SEPARATOR)"),
        ("preheader", r"What to bring\u007f", "U+007F (DELETE)"),
    ],
)
def test_what_would_break_a_header_is_refused_naming_the_file_step_and_character(
    tmp_path: Path, field: str, value: str, says: str
) -> None:
    body = STEP if field == "preheader" else '[[steps]]\nkey = "a"\n'
    body += f'{field} = "{value}"\n'
    with pytest.raises(CampaignError) as caught:
        load_campaign(write(tmp_path, body), "c")
    message = str(caught.value)
    assert "campaign.toml: step 'a'" in message and f"the {field}" in message
    assert says in message


def test_a_preheader_may_hold_an_equals_sign_and_question_mark(tmp_path: Path) -> None:
    """It is body text, not a header: only a subject may not look like an encoded word."""
    body = STEP + 'preheader = "Costs =? Ask us"\n'
    (step,) = load_campaign(write(tmp_path, body), "c").steps
    assert step.preheader == "Costs =? Ask us"


def _templates_with_a_broken_campaign(tmp_path: Path) -> Path:
    templates = tmp_path / "emails"
    shutil.copytree(TEMPLATES, templates)
    (templates / "broken").mkdir()
    (templates / "broken" / "campaign.toml").write_text('name = "Broken\n')  # unclosed string
    return templates


def test_one_broken_campaign_leaves_the_others_listed_and_is_named(tmp_path: Path) -> None:
    templates = _templates_with_a_broken_campaign(tmp_path)
    found, broken = load_all(templates)
    assert [c.slug for c in found] == ["ketamine-onboarding"]
    assert list(broken) == ["broken"] and "not valid TOML" in str(broken["broken"])
    environ = {"DRIP_SECRET_KEY": TEST_SECRET, "DRIP_TEMPLATES_DIR": str(templates)}
    for args in (["campaigns", "list"], ["campaigns", "list", "--json"]):
        result = CliRunner().invoke(cli, args, obj=App(environ=environ))
        assert result.exit_code == 0, result.output
        assert "ketamine-onboarding" in result.stdout and "broken" not in result.stdout
        assert f"warning: {templates / 'broken' / 'campaign.toml'}: not valid TOML" in (
            result.stderr
        )
    listed = json.loads(result.stdout)
    assert [(c["slug"], c["steps"][0]) for c in listed] == [("ketamine-onboarding", "welcome")]


def test_timeline_shows_the_rows_of_a_campaign_that_no_longer_loads(
    drip: Drip, tmp_path: Path
) -> None:
    templates = _templates_with_a_broken_campaign(tmp_path)
    env = {"DRIP_TEMPLATES_DIR": str(templates)}
    enrolled = drip("enroll", "ann@example.com", "--campaign", CAMPAIGN, "--first-name", "Ann",
                    env=env)  # fmt: skip
    assert enrolled.exit_code == 0, enrolled.output
    shown = drip("timeline", "ann@example.com", "--json", env=env)
    assert shown.exit_code == 0 and shown.stderr == ""  # another campaign's folder is broken
    in_order = [row["step"] for row in json.loads(shown.stdout)]

    toml = templates / CAMPAIGN / "campaign.toml"
    toml.write_text(toml.read_text() + '\n[[steps]]\nkey = "Bad Key"\n')
    for args in (["--json"], []):
        result = drip("timeline", "ann@example.com", *args, env=env)
        assert result.exit_code == 0, result.output
        assert f"warning: {toml}: step 9" in result.stderr and "planned" in result.stderr
    assert [row["step"] for row in json.loads(drip("timeline", "ann@example.com", "--json",
                                                    env=env).stdout)] == in_order  # fmt: skip
    assert "welcome" in result.stdout
