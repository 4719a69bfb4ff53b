"""The renderer: its fast path equals render-then-inline byte for byte; template errors are loud."""

from __future__ import annotations

import os
import shutil
import unicodedata
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import lxml.html
import pytest
from lxml import etree

from drip import rendering
from drip.campaigns import Campaign, load_campaign
from drip.errors import NotFound, TemplateError
from drip.rendering import PATIENT_VARIABLES, Renderer
from drip.settings import PROJECT_ROOT, Settings

TEMPLATES = PROJECT_ROOT / "templates" / "emails"
SLUG = "ketamine-onboarding"
URL = "https://drip.clinic.example/u/3.AbC_-9xYz.q1?x=1&y=2"
SAMPLES = [
    {"first_name": "Zoë", "last_name": "", "unsubscribe_url": URL},
    {"first_name": "José-María", "last_name": "Núñez Peña", "unsubscribe_url": URL},
    {"first_name": "李小龙", "last_name": "李", "unsubscribe_url": URL},
    {"first_name": "O'Brien", "last_name": "D'Arcy", "unsubscribe_url": URL},
    {"first_name": "Ann & Bo", "last_name": "Smith & Sons", "unsubscribe_url": URL},
    {"first_name": "<b>x</b>", "last_name": '"quoted"', "unsubscribe_url": URL},
    {"first_name": "Ngọc 🌸", "last_name": "a\u00a0b", "unsubscribe_url": URL},
]
PROBE_HTML = """{% extends "_layout.html.j2" %}
{% block content %}
<p>Hi {{ first_name }} {{ last_name|e }},</p>
<p><a href="{{ unsubscribe_url }}">{{ unsubscribe_url }}</a></p>
{% endblock %}
"""
PROBE_TEXT = """{% extends "_layout.txt.j2" %}
{% block content %}
Hi {{ first_name }} {{ last_name }},
{% endblock %}
"""
MakeCampaign = Callable[..., tuple[Renderer, Campaign]]


def settings_for(templates_dir: Path) -> Settings:
    return replace(Settings(), templates_dir=templates_dir)


@pytest.fixture
def renderer() -> Renderer:
    return Renderer(settings_for(TEMPLATES))


@pytest.fixture
def campaign() -> Campaign:
    return load_campaign(TEMPLATES, SLUG)


@pytest.fixture
def make_campaign(tmp_path: Path) -> MakeCampaign:
    """A copy of the shipped templates in tmp_path, plus a one-step campaign `probe` whose files
    are given (html=…, text=…), so tests can break or edit templates without touching the repo."""

    def make(html: str = PROBE_HTML, text: str = PROBE_TEXT) -> tuple[Renderer, Campaign]:
        root = tmp_path / "emails"
        if not root.exists():
            shutil.copytree(TEMPLATES, root)
        folder = root / "probe"
        folder.mkdir(exist_ok=True)
        (folder / "campaign.toml").write_text('[[steps]]\nkey = "one"\nsubject = "Hello"\n')
        (folder / "one.html.j2").write_text(html)
        (folder / "one.txt.j2").write_text(text)
        return Renderer(settings_for(root)), load_campaign(root, "probe")

    return make


def name_characters() -> str:
    """Every character a patient's name may hold (see drip.patients.check_name), and < and >."""
    refused = {"Cc", "Cs", "Co", "Cn", "Zl", "Zp"}
    code_points = [*range(0x20, 0x10000), *range(0x1F300, 0x1FB00)]
    return "".join(chr(c) for c in code_points if unicodedata.category(chr(c)) not in refused)


def canonical(html: str) -> bytes:
    return bytes(etree.tostring(lxml.html.document_fromstring(html), method="c14n"))


# --- the fast path equals the reference ----------------------------------------------------------


@pytest.mark.parametrize("step", load_campaign(TEMPLATES, SLUG).step_keys)
def test_fast_path_gives_exactly_the_bytes_of_render_then_inline_for_every_step(
    renderer: Renderer, campaign: Campaign, step: str
) -> None:
    for patient in SAMPLES:
        fast = renderer.render(campaign, step, patient)
        assert fast == renderer.render_reference(campaign, step, patient), patient


def test_a_name_that_looks_like_markup_comes_out_escaped(
    renderer: Renderer, campaign: Campaign
) -> None:
    html = renderer.render(campaign, "welcome", SAMPLES[5]).html
    assert "Hi &lt;b&gt;x&lt;/b&gt;," in html
    assert "<b>x</b>" not in html


def test_every_character_a_name_may_hold_comes_out_as_lxml_writes_it(
    make_campaign: MakeCampaign,
) -> None:
    renderer, campaign = make_campaign()
    everything = name_characters()
    patient = {
        "first_name": everything,
        "last_name": everything[::-1],
        # a URL cannot hold a raw double quote; everything else is percent-encoded like lxml does
        "unsubscribe_url": "https://x.example/u/" + everything.replace('"', ""),
    }
    fast = renderer.render(campaign, "one", patient)
    assert fast == renderer.render_reference(campaign, "one", patient)


def test_a_name_in_an_attribute_value_is_equal_in_canonical_form(
    make_campaign: MakeCampaign,
) -> None:
    renderer, campaign = make_campaign(
        html='{% extends "_layout.html.j2" %}{% block content %}'
        '<p title="For {{ first_name }}">Hi {{ first_name }}</p>{% endblock %}'
    )
    for patient in [*SAMPLES, {**SAMPLES[0], "first_name": "Say \"hi\" & 'bye'"}]:
        fast = renderer.render(campaign, "one", patient).html
        reference = renderer.render_reference(campaign, "one", patient).html
        # lxml picks the quote mark from the whole value: title='Say "hi"' when it holds a " and
        # no '. The fast path cannot move quote marks, so it writes title="Say &quot;hi&quot;":
        # the same attribute to every parser, but other bytes. Names hold no " in practice.
        if '"' not in patient["first_name"]:
            assert fast == reference
        assert canonical(fast) == canonical(reference)


def test_the_text_part_is_the_layout_with_the_patients_values_as_typed(
    renderer: Renderer, campaign: Campaign
) -> None:
    patient = SAMPLES[4]
    rendered = renderer.render(campaign, "welcome", patient)
    assert rendered.text == renderer.render_reference(campaign, "welcome", patient).text
    assert rendered.text.startswith("Hi Ann & Bo,\n")
    assert f"Unsubscribe: {URL}\n" in rendered.text
    assert "call or text 988, or call 911." in rendered.text


def test_the_html_is_a_full_document_with_the_footer_and_inlined_css(
    renderer: Renderer, campaign: Campaign
) -> None:
    settings = Settings()
    rendered = renderer.render(campaign, "insurance", SAMPLES[0])
    step = campaign.step("insurance")
    assert (rendered.subject, rendered.preheader) == (step.subject, step.preheader)
    html = rendered.html
    assert html.startswith('<!DOCTYPE html>\n<html lang="en">')
    for needle in [
        '<meta charset="utf-8">',
        '<meta name="viewport"',
        f"<title>{step.subject}</title>",
        'role="presentation"',
        f'<a href="{URL.replace("&", "&amp;")}"',
        "Unsubscribe</a>",
        "This mailbox is not watched for emergencies. If you are in crisis, call or text 988, "
        "or call 911.",
        "This email is general information, not medical advice.",
        settings.clinic_address,
        settings.clinic_phone,
        step.preheader,
        'style="margin:0; padding:0; background-color:#f4f5f7"',  # inlined onto <body>
        "@media (prefers-color-scheme: dark)",  # what cannot be inlined stays in <style>
    ]:
        assert needle in html, needle


def test_css_is_inlined_once_per_template_version_not_per_email(
    renderer: Renderer, campaign: Campaign, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    inline = rendering._inline

    def counting_inline(html: str, name: str) -> str:
        calls.append(name)
        return inline(html, name)

    monkeypatch.setattr(rendering, "_inline", counting_inline)
    for i in range(50):
        renderer.render(campaign, "welcome", {**SAMPLES[0], "first_name": f"P{i}"})
        renderer.render(campaign, "check-in", SAMPLES[1])
    assert len(calls) == 2


# --- a running worker picks up edited templates -------------------------------------------------


def edit(path: Path, old: str, new: str) -> None:
    """Change a file and move its mtime on, as an editor would a moment later."""
    path.write_text(path.read_text().replace(old, new))
    later = path.stat().st_mtime + 10
    os.utime(path, (later, later))


def test_editing_a_step_or_a_layout_changes_what_the_same_renderer_renders(
    make_campaign: MakeCampaign,
) -> None:
    renderer, campaign = make_campaign()
    before = renderer.render(campaign, "one", SAMPLES[0])
    assert "Hi Zoë" in before.html and "Hello Zoë" not in before.html

    edit(campaign.path / "one.html.j2", "Hi ", "Hello ")
    assert "Hello Zoë" in renderer.render(campaign, "one", SAMPLES[0]).html

    edit(campaign.path.parent / "_layout.txt.j2", "Phone:", "Telephone:")
    text = renderer.render(campaign, "one", SAMPLES[0]).text
    assert "Telephone: " in text
    assert renderer.render(campaign, "one", SAMPLES[0]) == renderer.render_reference(
        campaign, "one", SAMPLES[0]
    )


# --- template errors ----------------------------------------------------------------------------


def test_an_unknown_variable_is_a_template_error_naming_the_file_and_line(
    make_campaign: MakeCampaign,
) -> None:
    renderer, campaign = make_campaign(
        html='{% extends "_layout.html.j2" %}\n{% block content %}\n<p>{{ middle_name }}</p>\n'
        "{% endblock %}\n"
    )
    for render in (renderer.render, renderer.render_reference):
        with pytest.raises(TemplateError, match=r"one\.html\.j2, line 3: .*middle_name"):
            render(campaign, "one", SAMPLES[0])


def test_a_syntax_error_is_a_template_error_naming_the_file_and_line(
    make_campaign: MakeCampaign,
) -> None:
    renderer, campaign = make_campaign(text="Hi\n{% if %}\n")
    with pytest.raises(TemplateError, match=r"one\.txt\.j2, line 2: "):
        renderer.render(campaign, "one", SAMPLES[0])


def test_a_missing_part_is_a_template_error_naming_the_file(make_campaign: MakeCampaign) -> None:
    renderer, campaign = make_campaign()
    (campaign.path / "one.txt.j2").unlink()
    with pytest.raises(TemplateError, match=r"probe/one\.txt\.j2: no such template"):
        renderer.render(campaign, "one", SAMPLES[0])


def test_a_missing_layout_is_a_template_error_naming_who_wanted_it(
    make_campaign: MakeCampaign,
) -> None:
    renderer, campaign = make_campaign(text='{% extends "_plain.txt.j2" %}')
    with pytest.raises(TemplateError, match=r"probe/one\.txt\.j2: uses '_plain\.txt\.j2'"):
        renderer.render(campaign, "one", SAMPLES[0])


@pytest.mark.parametrize(
    "misuse",
    [
        "{% if first_name %}x{% endif %}",
        "{{ first_name|upper }}",
        "{{ first_name ~ '!' }}",
        "{{ unsubscribe_url|safe }}",
        "{% set name = last_name %}{{ name }}",
        "{% for c in first_name %}{{ c }}{% endfor %}",
    ],
)
def test_a_per_patient_variable_used_other_than_output_is_refused_with_file_and_line(
    make_campaign: MakeCampaign, misuse: str
) -> None:
    renderer, campaign = make_campaign(
        html='{% extends "_layout.html.j2" %}\n{% block content %}\n' + misuse + "\n{% endblock %}"
    )
    with pytest.raises(TemplateError, match=r"one\.html\.j2, line 3: \w+ differs for each patient"):
        renderer.render(campaign, "one", SAMPLES[0])


def test_html_escaping_in_the_text_part_is_refused(make_campaign: MakeCampaign) -> None:
    renderer, campaign = make_campaign(text="Hi {{ first_name|e }}\n")
    with pytest.raises(TemplateError, match="first_name differs for each patient"):
        renderer.render(campaign, "one", SAMPLES[0])


def test_a_missing_patient_value_or_step_is_refused(renderer: Renderer, campaign: Campaign) -> None:
    with pytest.raises(TemplateError, match="unsubscribe_url"):
        renderer.render(campaign, "welcome", {"first_name": "A", "last_name": ""})
    with pytest.raises(NotFound, match="welcome"):
        renderer.render(campaign, "goodbye", SAMPLES[0])
    assert set(PATIENT_VARIABLES) == set(SAMPLES[0])
