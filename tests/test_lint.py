"""`drip campaigns validate`: each test breaks one thing in a copy of the shipped templates."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from drip.cli import App, cli
from drip.lint import MAX_HTML_BYTES, SENSITIVE_WORDS, reading_grade, sensitive_words
from tests.conftest import ROOT, TEST_SECRET

SHIPPED = ROOT / "templates" / "emails"
CAMPAIGN = "ketamine-onboarding"
CHECKER = ROOT.parent / "shared" / "tools" / "check_email.py"

Validate = Callable[..., Result]


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """A copy of the shipped templates, to break."""
    copy = tmp_path / "templates" / "emails"
    shutil.copytree(SHIPPED, copy)
    return copy


@pytest.fixture
def validate(tmp_path: Path) -> Validate:
    """Run `drip campaigns validate [args]` on a templates dir; no database is involved."""

    def run(templates_dir: Path, *args: str) -> Result:
        environ = {
            "DRIP_TEMPLATES_DIR": str(templates_dir),
            "DRIP_SECRET_KEY": TEST_SECRET,
            "DRIP_NOW": "2026-10-30T14:00:00Z",
            "DRIP_DATABASE_URL": f"sqlite:///{tmp_path / 'not-used.db'}",
        }
        return CliRunner().invoke(cli, ["campaigns", "validate", *args], obj=App(environ=environ))

    return run


def findings(validate: Validate, templates_dir: Path) -> list[dict[str, Any]]:
    result = validate(templates_dir, "--json")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    found: list[dict[str, Any]] = json.loads(result.stdout)
    assert result.exit_code == (1 if found else 0), result.output
    return found


def step_file(templates: Path, step: str, suffix: str) -> Path:
    return templates / CAMPAIGN / f"{step}.{suffix}.j2"


def edit(path: Path, old: str, new: str) -> None:
    source = path.read_text(encoding="utf-8")
    assert old in source, f"{old!r} is no longer in {path}"
    path.write_text(source.replace(old, new, 1), encoding="utf-8")


def replace_content(path: Path, content: str) -> None:
    """Keep the template's {% extends %}, give it a new content block."""
    extends = re.search(r"{%\s*extends[^%]*%}", path.read_text(encoding="utf-8"))
    assert extends is not None
    path.write_text(
        f"{extends.group()}\n{{% block content %}}\n{content}\n{{% endblock %}}\n",
        encoding="utf-8",
    )


# --- the shipped campaign -----------------------------------------------------------------------


def test_the_shipped_campaign_passes(validate: Validate) -> None:
    result = validate(SHIPPED)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"1 campaign, \d+ steps: no problems\n", result.stdout)


def test_validate_names_one_campaign_or_refuses_an_unknown_one(
    validate: Validate, templates: Path
) -> None:
    assert validate(templates, CAMPAIGN).exit_code == 0
    result = validate(templates, "no-such-campaign")
    assert result.exit_code == 1
    assert "no campaign 'no-such-campaign'" in result.stderr and CAMPAIGN in result.stderr


def test_an_empty_templates_dir_is_an_error(validate: Validate, tmp_path: Path) -> None:
    result = validate(tmp_path)
    assert result.exit_code == 1 and "no campaigns in" in result.stderr


# --- one thing broken each ----------------------------------------------------------------------


def test_an_unknown_variable_is_refused_with_its_file_and_line(
    validate: Validate, templates: Path
) -> None:
    path = step_file(templates, "welcome", "txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if "block content" in line) + 1
    lines.insert(at, "Your diagnosis: {{ diagnosis }}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = validate(templates)
    assert result.exit_code == 1
    where = f"emails/{CAMPAIGN}/welcome.txt.j2:{at + 1}: unknown variable 'diagnosis'"
    assert where in result.stdout
    (finding,) = [f for f in findings(validate, templates) if f["code"] == "variable"]
    assert finding["file"] == f"emails/{CAMPAIGN}/welcome.txt.j2"
    assert finding["line"] == at + 1 and finding["step"] == "welcome"


def test_an_unknown_variable_in_a_layout_is_reported_once_at_the_layout(
    validate: Validate, templates: Path
) -> None:
    edit(templates / "_layout.html.j2", "{{ clinic_address }}", "{{ clinic_fax }}")
    found = [f for f in findings(validate, templates) if f["code"] == "variable"]
    assert len(found) == 1
    assert found[0]["file"] == "emails/_layout.html.j2" and found[0]["step"] is None
    assert "'clinic_fax'" in found[0]["message"] and isinstance(found[0]["line"], int)


def test_a_step_without_its_text_part_is_refused(validate: Validate, templates: Path) -> None:
    step_file(templates, "medications", "txt").unlink()
    found = findings(validate, templates)
    (missing,) = [f for f in found if f["code"] == "missing-part"]
    assert missing["file"] == f"emails/{CAMPAIGN}/medications.txt.j2"
    assert missing["step"] == "medications"


def test_a_sensitive_word_in_a_subject_is_refused(validate: Validate, templates: Path) -> None:
    toml = templates / CAMPAIGN / "campaign.toml"
    edit(toml, 'subject = "Welcome', 'subject = "Your Ketamine plan: welcome')
    (found,) = [f for f in findings(validate, templates) if f["code"].startswith("sensitive")]
    assert found["code"] == "sensitive-subject" and found["step"] == "welcome"
    assert "'ketamine'" in found["message"]
    assert found["file"] == f"emails/{CAMPAIGN}/campaign.toml"
    line = toml.read_text(encoding="utf-8").splitlines()[found["line"] - 1]
    assert line.startswith("subject = ") and "Ketamine" in line


def test_a_sensitive_word_in_a_preheader_is_refused_even_inside_a_hyphenated_word(
    validate: Validate, templates: Path
) -> None:
    toml = templates / CAMPAIGN / "campaign.toml"
    edit(toml, 'preheader = "', 'preheader = "Your post-infusion checklist. ')
    (found,) = [f for f in findings(validate, templates) if f["code"].startswith("sensitive")]
    assert found["code"] == "sensitive-preheader" and "'infusion'" in found["message"]
    assert toml.read_text(encoding="utf-8").splitlines()[found["line"] - 1].startswith("preheader")


def test_a_missing_crisis_number_in_the_text_footer_is_refused(
    validate: Validate, templates: Path
) -> None:
    edit(templates / "_layout.txt.j2", "call or text 988, or call 911", "call 911")
    found = [f for f in findings(validate, templates) if f["code"] == "footer"]
    assert found, "no footer finding"
    for finding in found:
        assert finding["file"].endswith(".txt.j2") and "988" in finding["message"]
    # Every step whose own words do not mention 988 is refused.
    without = {
        p.name.split(".")[0]
        for p in (templates / CAMPAIGN).glob("*.txt.j2")
        if "988" not in p.read_text(encoding="utf-8")
    }
    assert {f["step"] for f in found} == without


def test_an_unsubscribe_link_without_visible_text_is_refused(
    validate: Validate, templates: Path
) -> None:
    layout = templates / "_layout.html.j2"
    source = layout.read_text(encoding="utf-8")
    link = re.search(r'<a href="{{ unsubscribe_url }}"[^>]*>.*?</a>', source)
    assert link is not None
    layout.write_text(source.replace(link.group(), '<a href="{{ unsubscribe_url }}"></a>'))
    found = [f for f in findings(validate, templates) if f["code"] == "footer"]
    assert found and all("unsubscribe link" in f["message"] for f in found)
    assert all(f["file"].endswith(".html.j2") for f in found)


def test_an_email_over_100_kb_is_refused(validate: Validate, templates: Path) -> None:
    paragraph = "<p>Please bring a friend who can drive you home after the visit.</p>\n"
    padding = paragraph * (MAX_HTML_BYTES // len(paragraph) + 100)
    edit(step_file(templates, "welcome", "html"), "{% endblock %}", padding + "{% endblock %}")
    (found,) = [f for f in findings(validate, templates) if f["code"] == "size"]
    assert found["step"] == "welcome" and found["file"].endswith("welcome.html.j2")
    assert "KB" in found["message"]


HARD_PROSE = (
    "Comprehensive pharmacological evaluations, administered by interdisciplinary practitioners, "
    "systematically determine individual eligibility, contraindications, and the anticipated "
    "therapeutic trajectory throughout the entirety of the preliminary consultation."
)
HARD_TEXT = "Hi {{ first_name }},\n\n" + HARD_PROSE


def test_a_text_part_above_grade_8_is_refused(validate: Validate, templates: Path) -> None:
    replace_content(step_file(templates, "welcome", "txt"), HARD_TEXT)
    (found,) = [f for f in findings(validate, templates) if f["code"] == "grade"]
    assert found["step"] == "welcome" and found["file"].endswith("welcome.txt.j2")
    grade = float(re.search(r"grade (\d+\.\d)", found["message"]).group(1))  # type: ignore[union-attr]
    assert grade > 8


def test_the_grade_is_the_one_the_external_checker_reports(templates: Path, tmp_path: Path) -> None:
    """Same text (the text/plain part of the message, footer and all) and the same formula as
    shared/tools/check_email.py, on the same email."""
    if not CHECKER.is_file():
        pytest.skip(f"{CHECKER} is not here")
    sys.path.insert(0, str(CHECKER.parent))
    try:
        import check_email  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(CHECKER.parent))
    replace_content(step_file(templates, "welcome", "txt"), HARD_TEXT)
    out = tmp_path / "welcome.eml"
    environ = {"DRIP_TEMPLATES_DIR": str(templates), "DRIP_SECRET_KEY": TEST_SECRET}
    args = ["preview", CAMPAIGN, "welcome", "--format", "eml", "--out", str(out)]
    assert CliRunner().invoke(cli, args, obj=App(environ=environ)).exit_code == 0
    text = BytesParser(policy=policy.default).parsebytes(out.read_bytes()).get_body(("plain",))
    assert text is not None
    checker_grade = check_email.reading_grade(text.get_content())
    assert checker_grade > 8 and reading_grade(text.get_content()) == checker_grade


def test_a_template_syntax_error_is_a_finding_with_its_line(
    validate: Validate, templates: Path
) -> None:
    path = step_file(templates, "insurance", "html")
    edit(path, "{% block content %}", "{% block content %}\n{% if %}")
    (found,) = [f for f in findings(validate, templates) if f["code"] == "template"]
    assert found["file"].endswith("insurance.html.j2") and found["step"] == "insurance"
    assert isinstance(found["line"], int)


def test_a_per_patient_variable_that_is_tested_is_a_finding(
    validate: Validate, templates: Path
) -> None:
    path, misuse = step_file(templates, "check-in", "txt"), "{% if first_name %}Hi{% endif %}"
    edit(path, "{% block content %}", "{% block content %}\n" + misuse)
    line = path.read_text(encoding="utf-8").splitlines().index(misuse)
    (found,) = [f for f in findings(validate, templates) if f["code"] == "template"]
    assert found["file"] == f"emails/{CAMPAIGN}/check-in.txt.j2" and found["line"] == line + 1
    assert "first_name differs for each patient" in found["message"]


def test_a_broken_campaign_toml_is_a_finding_not_a_crash(
    validate: Validate, templates: Path
) -> None:
    toml = templates / CAMPAIGN / "campaign.toml"
    toml.write_text(toml.read_text(encoding="utf-8") + "\n[[steps]\nkey = 'x'\n")
    result = validate(templates)
    assert result.exit_code == 1 and "Traceback" not in result.output
    (found,) = findings(validate, templates)
    assert found["code"] == "campaign" and found["file"] == f"emails/{CAMPAIGN}/campaign.toml"
    assert isinstance(found["line"], int) and "not valid TOML" in found["message"]


def test_a_subject_on_two_lines_is_a_campaign_finding_not_a_crash(
    validate: Validate, templates: Path
) -> None:
    """campaign.toml's loader refuses it, so the linter reports it as it reports a broken step."""
    toml = templates / CAMPAIGN / "campaign.toml"
    edit(
        toml, 'subject = "Welcome to your care team"', 'subject = """Welcome\nto your care team"""'
    )
    (found,) = findings(validate, templates)
    assert found["code"] == "campaign" and found["file"] == f"emails/{CAMPAIGN}/campaign.toml"
    assert "step 'welcome'" in found["message"] and "more than one line" in found["message"]


@pytest.mark.parametrize(
    ("subject", "says"),
    [
        ("Welcome\\r\\nBcc: a@evil.example", "more than one line"),
        ("Welcome\\n", "more than one line"),
        ("Welcome\\u2028Bcc: a@evil.example", "U+2028 (LINE SEPARATOR)"),
        ("Welcome\\u0085", "U+0085 (NEXT LINE)"),
        ("=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?=", "RFC 2047 encoded word"),
    ],
)
def test_a_subject_that_would_break_its_header_is_a_finding_naming_file_step_and_character(
    validate: Validate, templates: Path, subject: str, says: str
) -> None:
    toml = templates / CAMPAIGN / "campaign.toml"
    edit(toml, 'subject = "Welcome to your care team"', f'subject = "{subject}"')
    (found,) = findings(validate, templates)
    assert found["code"] == "campaign" and found["file"] == f"emails/{CAMPAIGN}/campaign.toml"
    assert "step 'welcome'" in found["message"] and says in found["message"]


def test_a_campaign_folder_outside_the_templates_dir_is_a_finding_not_a_crash(
    validate: Validate, templates: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    shutil.copytree(templates / CAMPAIGN, outside)
    (templates / "linked").symlink_to(outside, target_is_directory=True)
    result = validate(templates)
    assert result.exit_code == 1 and "Traceback" not in result.output
    found = [f for f in findings(validate, templates) if "linked" in f["file"]]
    assert [f["code"] for f in found] == ["campaign"]
    assert "not inside the templates dir" in found[0]["message"]


# --- output ------------------------------------------------------------------------------------


def test_json_output_is_a_list_of_findings_with_a_fixed_shape(
    validate: Validate, templates: Path
) -> None:
    assert findings(validate, templates) == []
    step_file(templates, "welcome", "html").unlink()
    edit(templates / CAMPAIGN / "campaign.toml", 'subject = "Welcome', 'subject = "PTSD: welcome')
    result = validate(templates, "--json")
    assert result.exit_code == 1
    found = json.loads(result.stdout)
    assert isinstance(found, list) and len(found) == 2
    for finding in found:
        assert set(finding) == {"file", "line", "step", "code", "message"}
        assert isinstance(finding["file"], str) and isinstance(finding["message"], str)
        assert finding["line"] is None or isinstance(finding["line"], int)
    assert {f["code"] for f in found} == {"missing-part", "sensitive-subject"}
    assert "2 problems" in result.stderr


def test_text_output_is_one_finding_a_line_then_a_summary_on_stderr(
    validate: Validate, templates: Path
) -> None:
    step_file(templates, "welcome", "html").unlink()
    step_file(templates, "insurance", "txt").unlink()
    result = validate(templates)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"emails/{CAMPAIGN}/welcome.html.j2: step 'welcome' has no welcome.html.j2; every step "
        "needs both welcome.html.j2 and welcome.txt.j2",
        f"emails/{CAMPAIGN}/insurance.txt.j2: step 'insurance' has no insurance.txt.j2; every "
        "step needs both insurance.html.j2 and insurance.txt.j2",
    ]
    assert re.search(r"1 campaign, \d+ steps: 2 problems", result.stderr)


# --- the word list ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Welcome to your care team", []),
        ("Your KETAMINE visit", ["ketamine"]),
        ("A ketamine-assisted plan", ["ketamine"]),
        ("Infusions this week", ["infusion"]),
        ("Mental-health resources", ["mental health"]),
        ("Treatment resistant? Call us", ["treatment-resistant"]),
        ("Painting class and a trip to Spain", []),
        ("Your dose, and your PTSD", ["ptsd", "dose"]),
    ],
)
def test_sensitive_words_match_whole_words_in_any_case(text: str, words: list[str]) -> None:
    assert sorted(sensitive_words(text)) == sorted(words)


def test_the_word_list_covers_drugs_conditions_and_revealing_treatment_words() -> None:
    for word in ("ketamine", "esketamine", "spravato", "depression", "anxiety", "ptsd",
                 "suicidal", "mental health", "infusion", "psychedelic", "dose"):  # fmt: skip
        assert word in SENSITIVE_WORDS


def test_a_template_that_is_not_utf8_is_a_finding_with_its_file_not_a_traceback(
    validate: Validate, templates: Path
) -> None:
    step_file(templates, "welcome", "txt").write_bytes(b"\xff\xfe Hello {{ first_name }}\n")
    result = validate(templates)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"emails/{CAMPAIGN}/welcome.txt.j2: is not UTF-8 text" in result.stdout
    (finding,) = [f for f in findings(validate, templates) if "UTF-8" in f["message"]]
    assert finding["file"] == f"emails/{CAMPAIGN}/welcome.txt.j2"
