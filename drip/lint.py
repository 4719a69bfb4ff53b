"""The campaign linter (DESIGN §7): what `drip campaigns validate` refuses, and where.

For each campaign in the templates dir it checks, in this order:

    campaign      campaign.toml loads (valid TOML, well-formed steps, a one-line subject and
                  preheader) and the folder is a slug inside the templates dir
    missing-part  every step has both <step>.html.j2 and <step>.txt.j2
    template      every template and the layouts it extends parse, and render for a sample patient
                  (a per-patient variable used other than plainly output is refused by Renderer)
    variable      every variable a template or its layouts use is in the allowed list
                  (drip.rendering: PATIENT_VARIABLES + PROCESS_VARIABLES + STEP_VARIABLES)
    sensitive     no subject or preheader names a drug, diagnosis, condition or a treatment
                  that reveals them (SENSITIVE_WORDS): lock screens and shared inboxes show them
    footer        the rendered HTML and text parts each show the clinic's name and postal address,
                  the unsubscribe link (in HTML an <a href> with visible text), the line that the
                  mailbox is not watched for emergencies with 988 and 911, and "not medical advice"
    size          the rendered, inlined HTML is at most 100 KB (Gmail clips messages at 102 KB)
    grade         the text part reads at Flesch-Kincaid grade 8 or below

Each step is rendered the way the worker sends it (drip.messages.compose, for its SAMPLE_PATIENT)
and the footer and grade checks read the message back with Python's email parser, so they see what
a mail client sees. The grade is computed exactly as shared/tools/check_email.py does
it: textstat 0.7.4's flesch_kincaid_grade over the whole text/plain part, footer included, with
URLs, addresses and [n] references blanked out.

Findings never stop the run: a broken campaign.toml is a finding like any other.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes

from drip.campaigns import SLUG, Campaign, Step, campaign_slugs, load_campaign
from drip.errors import DripError, NotFound, TemplateError
from drip.messages import SAMPLE_PATIENT, compose
from drip.rendering import (
    PATIENT_VARIABLES,
    PROCESS_VARIABLES,
    STEP_VARIABLES,
    Renderer,
    environment,
    read_template,
    template_names,
)
from drip.settings import Settings
from drip.wording import SENSITIVE_WORDS as SENSITIVE_WORDS  # re-exported
from drip.wording import sensitive_words

ALLOWED_VARIABLES = frozenset(PATIENT_VARIABLES + PROCESS_VARIABLES + STEP_VARIABLES)
MAX_HTML_BYTES = 100 * 1024
MAX_GRADE = 8.0

_URLS_AND_ADDRESSES = re.compile(r"(https?://\S+|\S+@\S+|\[\d+\])")  # as check_email.py strips


def reading_grade(text: str) -> float:
    """Flesch-Kincaid grade of a text/plain part, computed as check_email.py computes it."""
    with warnings.catch_warnings():  # textstat 0.7.4 imports pkg_resources, which warns
        warnings.simplefilter("ignore")
        import textstat
    prose = _URLS_AND_ADDRESSES.sub(" ", text)
    return float(textstat.flesch_kincaid_grade(prose))


@dataclass(frozen=True)
class Finding:
    """One problem: where (file relative to the templates dir's parent, line if known), which
    step (None for a whole campaign or a shared layout), what kind (code) and what to do."""

    file: str
    line: int | None
    step: str | None
    code: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """What a run checked and what it found."""

    campaigns: int = 0
    steps: int = 0
    findings: list[Finding] = field(default_factory=list)

    def summary(self) -> str:
        checked = f"{_count(self.campaigns, 'campaign')}, {_count(self.steps, 'step')}"
        if not self.findings:
            return f"{checked}: no problems"
        return (
            f"{checked}: {_count(len(self.findings), 'problem')}; "
            "fix them and run `drip campaigns validate` again"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def validate(settings: Settings, slug: str | None = None, *, now: datetime) -> Report:
    """Lint every campaign in settings.templates_dir, or only `slug` (NotFound if it is none)."""
    slugs = campaign_slugs(settings.templates_dir)
    if not slugs or (slug is not None and slug not in slugs):
        known = ", ".join(slugs) or "none"
        wanted = f"no campaign {slug!r}" if slug is not None else "no campaigns"
        raise NotFound(
            f"{wanted} in {settings.templates_dir} (folders holding a campaign.toml); "
            f"campaigns there: {known}; set DRIP_TEMPLATES_DIR to the folder of campaigns"
        )
    linter = _Linter(settings, now)
    for each in [slug] if slug is not None else slugs:
        linter.campaign(each)
    return linter.report


class _Linter:
    """One run: the findings so far, and what is known about each template file."""

    def __init__(self, settings: Settings, now: datetime) -> None:
        self.settings, self.now = settings, now
        self.templates_dir = settings.templates_dir
        self.root = settings.templates_dir.resolve()
        self.renderer = Renderer(settings)
        self.env = environment(self.root, autoescape=False)  # only parses: escaping is moot
        self.report = Report()
        self.file_ok: dict[str, bool] = {}  # template name -> it and what it extends are fine

    def add(self, path: Path, line: int | None, step: str | None, code: str, msg: str) -> None:
        finding = Finding(self._display(path), line, step, code, msg)
        if finding not in self.report.findings:
            self.report.findings.append(finding)

    def _display(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.root.parent).as_posix()
        except ValueError:
            return str(path)

    # --- one campaign ---------------------------------------------------------------------

    def campaign(self, slug: str) -> None:
        self.report.campaigns += 1
        source = self.templates_dir / slug / "campaign.toml"
        if not SLUG.match(slug):
            message = f"folder name {slug!r} is not a slug: use lowercase letters, digits and -"
            self.add(source.parent, None, None, "campaign", message)
            return
        try:
            campaign = load_campaign(self.templates_dir, slug)
        except DripError as e:
            message = str(e).removeprefix(f"{source}: ")
            line = re.search(r"at line (\d+)", message)
            self.add(source, int(line.group(1)) if line else None, None, "campaign", message)
            return
        toml_lines = source.read_text(encoding="utf-8").splitlines()
        for index, step in enumerate(campaign.steps):
            self.report.steps += 1
            self._subject_and_preheader(source, toml_lines, index, step)
            names = self._templates(campaign, step.key)
            if names is not None:
                self._rendered(campaign, step.key, names)

    def _subject_and_preheader(
        self, source: Path, toml_lines: list[str], index: int, step: Step
    ) -> None:
        for name in ("subject", "preheader"):
            value = getattr(step, name)
            for word in sensitive_words(value):
                self.add(
                    source,
                    _field_line(toml_lines, index, name),
                    step.key,
                    f"sensitive-{name}",
                    f"step {step.key!r}: the {name} {value!r} says {word!r}; lock screens and "
                    "shared inboxes show it, so name no drug, diagnosis or condition",
                )

    # --- the templates of one step, before rendering ----------------------------------------

    def _templates(self, campaign: Campaign, step_key: str) -> tuple[str, str] | None:
        """The step's (HTML, text) template names, if both parts exist, and they and their
        layouts parse and use only allowed variables; None once that is reported."""
        try:
            names = template_names(campaign, step_key, self.root)
        except TemplateError as e:
            self.add(campaign.path, None, None, "campaign", str(e))
            return None
        folder = names[0].rpartition("/")[0]
        ok = True
        for name, suffix in zip(names, ("html", "txt"), strict=True):
            if not (self.root / name).is_file():
                self.add(
                    self.root / name,
                    None,
                    step_key,
                    "missing-part",
                    f"step {step_key!r} has no {step_key}.{suffix}.j2; every step needs both "
                    f"{step_key}.html.j2 and {step_key}.txt.j2",
                )
                ok = False
            elif not self._template(name, step_key, folder):
                ok = False
        return names if ok else None

    def _template(self, name: str, step_key: str, folder: str) -> bool:
        if name in self.file_ok:
            return self.file_ok[name]
        self.file_ok[name] = True  # a template that extends itself stops here
        path = self.root / name
        step = step_key if name.startswith(f"{folder}/") else None
        try:
            tree = self.env.parse(read_template(path), name, str(path))
        except jinja2.TemplateSyntaxError as e:
            self.add(path, e.lineno, step, "template", e.message or "syntax error")
            self.file_ok[name] = False
            return False
        except TemplateError as e:
            self.add(path, None, step, "template", str(e).removeprefix(f"{path}: "))
            self.file_ok[name] = False
            return False
        ok = self._variables(tree, path, step)
        for referenced, line in _references(tree):
            if referenced is None:
                message = "extends or includes a computed name; use a literal template name"
                self.add(path, line, step, "template", message)
                ok = False
            elif not (self.root / referenced).is_file():
                message = f"uses {referenced!r}, which is not in {self.templates_dir}"
                self.add(path, line, step, "template", message)
                ok = False
            elif not self._template(referenced, step_key, folder):
                ok = False
        self.file_ok[name] = ok
        return ok

    def _variables(self, tree: nodes.Template, path: Path, step: str | None) -> bool:
        unknown = meta.find_undeclared_variables(tree) - ALLOWED_VARIABLES
        for node in tree.find_all(nodes.Name):
            if node.name in unknown and node.ctx == "load":
                self.add(
                    path,
                    node.lineno,
                    step,
                    "variable",
                    f"unknown variable {node.name!r}; templates may use only "
                    f"{', '.join(sorted(ALLOWED_VARIABLES))}",
                )
        return not unknown

    # --- the email as it is sent ------------------------------------------------------------

    def _rendered(self, campaign: Campaign, step_key: str, names: tuple[str, str]) -> None:
        html_file, text_file = (self.root / name for name in names)
        try:
            composed = compose(
                self.settings, self.renderer, campaign, step_key, SAMPLE_PATIENT, now=self.now
            )
        except DripError as e:
            self._render_error(str(e), html_file, step_key)
            return
        email = BytesParser(policy=policy.default).parsebytes(composed.message)
        html, text = _body(email, "html"), _body(email, "plain")
        link = str(email["List-Unsubscribe"]).strip().strip("<>")
        for element in _missing_in_text(text, self.settings, link):
            self._footer(text_file, step_key, "text", element)
        for element in _missing_in_html(html, self.settings, link):
            self._footer(html_file, step_key, "HTML", element)
        size = len(composed.rendered.html.encode("utf-8"))
        if size > MAX_HTML_BYTES:
            message = (
                f"the HTML is {size / 1024:.0f} KB after inlining; Gmail clips emails over "
                "102 KB: keep it under 100 KB"
            )
            self.add(html_file, None, step_key, "size", message)
        grade = reading_grade(text)
        if grade > MAX_GRADE:
            self.add(
                text_file,
                None,
                step_key,
                "grade",
                f"the text part reads at grade {grade:.1f} (Flesch-Kincaid, footer included); "
                f"keep it at {MAX_GRADE:.0f} or below: shorter sentences, shorter words",
            )

    def _render_error(self, error: str, fallback: Path, step_key: str) -> None:
        where = re.match(r"(?s)(?P<file>[^\n]+?), line (?P<line>\d+): (?P<message>.*)", error)
        if where:
            file = Path(where["file"])
            step = step_key if file.name.startswith(f"{step_key}.") else None
            self.add(file, int(where["line"]), step, "template", where["message"])
        else:
            self.add(fallback, None, step_key, "template", error)

    def _footer(self, file: Path, step_key: str, part: str, element: str) -> None:
        message = (
            f"the {part} part of step {step_key!r} does not show {element} "
            "(the footer belongs in the layout it extends)"
        )
        self.add(file, None, step_key, "footer", message)


# --- reading the rendered email --------------------------------------------------------------


def _body(message: EmailMessage, subtype: str) -> str:
    part = message.get_body((subtype,))
    return str(part.get_content()) if part is not None else ""


def _footer_elements(settings: Settings) -> list[tuple[str, re.Pattern[str]]]:
    """(what is missing, how to find it in visible text with whitespace collapsed)."""
    name, address = settings.clinic_name, settings.clinic_address
    return [
        (f"the clinic's name {name!r}", _literal(name)),
        (f"the clinic's postal address {address!r}", _literal(address)),
        ("that the mailbox is not watched for emergencies", re.compile(r"not\s+watched", re.I)),
        ("the crisis line 988", re.compile(r"(?<!\d)988(?!\d)")),
        ("the emergency number 911", re.compile(r"(?<!\d)911(?!\d)")),
        ("that it is not medical advice", re.compile(r"not\s+medical\s+advice", re.I)),
    ]


def _literal(value: str) -> re.Pattern[str]:
    return re.compile(r"\s+".join(re.escape(word) for word in value.split()), re.I)


def _missing_in_text(text: str, settings: Settings, link: str) -> Iterator[str]:
    for element, pattern in _footer_elements(settings):
        if not pattern.search(text):
            yield element
    if link not in text:
        yield "the unsubscribe link"


def _missing_in_html(html: str, settings: Settings, link: str) -> Iterator[str]:
    page = _VisibleText()
    page.feed(html)
    page.close()
    visible = " ".join(page.text)
    for element, pattern in _footer_elements(settings):
        if not pattern.search(visible):
            yield element
    if not any(href == link and text.strip() for href, text in page.links):
        yield "the unsubscribe link as <a href> with visible text"


class _VisibleText(HTMLParser):
    """The text a reader sees (not <head>, <style>, <script> or the hidden preheader) and every
    link with its visible text."""

    _HIDDEN = {"head", "style", "script", "title", "template"}
    _VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
             "track", "wbr"}  # fmt: skip

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.links: list[tuple[str, str]] = []
        self._hidden_depth = 0
        self._link: list[str] | None = None
        self._href = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._VOID:
            return
        classes = (dict(attrs).get("class") or "").split()
        if self._hidden_depth or tag in self._HIDDEN or "preheader" in classes:
            self._hidden_depth += 1
        elif tag == "a":
            self._link, self._href = [], dict(attrs).get("href") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag in self._VOID:
            return
        if self._hidden_depth:
            self._hidden_depth -= 1
        elif tag == "a" and self._link is not None:
            self.links.append((self._href, " ".join(self._link)))
            self._link = None

    def handle_data(self, data: str) -> None:
        if self._hidden_depth:
            return
        self.text.append(data)
        if self._link is not None:
            self._link.append(data)


# --- where things are in the source ------------------------------------------------------------


def _references(tree: nodes.Template) -> Iterator[tuple[str | None, int]]:
    """Each template a template extends, includes or imports, with the line that names it."""
    for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        target = getattr(node, "template", None)
        if isinstance(target, nodes.Const) and isinstance(target.value, str):
            yield target.value, node.lineno
        elif isinstance(target, nodes.Const) and isinstance(target.value, list | tuple):
            yield from ((str(value), node.lineno) for value in target.value)
        else:
            yield None, node.lineno


def _field_line(lines: list[str], step_index: int, name: str) -> int | None:
    """The line of `name = …` in the step_index-th [[steps]] table of campaign.toml."""
    seen, inside = -1, False
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("["):
            inside = stripped.replace(" ", "") == "[[steps]]"
            seen += inside
        elif inside and seen == step_index and re.match(rf"{name}\s*=", stripped):
            return number
    return None
