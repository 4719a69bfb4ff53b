"""Rendering campaign emails: CSS inlined once per template version, microseconds per email.

Inlining CSS with premailer costs about 9 ms, a hundred times the rest of an email's work, and its
result only changes when a template does. So each step's HTML is rendered and inlined once per
*template version* (the step's files, the layouts they extend, and their modification times) with
every per-patient variable replaced by a token, a plain word that Jinja, lxml and premailer all
leave alone, in text and in href attributes alike. The inlined HTML is then cut at the tokens into
literal segments and slots. An email is those segments joined around the patient's escaped values.
The text part gets the same treatment without inlining.

The rule that makes this correct, enforced when a template is compiled: **per-patient variables**
(`PATIENT_VARIABLES`: first_name, last_name, unsubscribe_url) **may only be output**, as
`{{ first_name }}` (or `{{ first_name|e }}` in HTML), in text or in a quoted attribute value. They
may not be tested in `{% if %}`, looped over, filtered, joined, assigned or passed to macros: those
would run once, on the token, instead of on each patient's value. Everything else a template sees is
the same for every email of a step: clinic_name, clinic_address, clinic_phone, clinic_route
(how the clinic gives treatment, e.g. "IV infusion"), resources_url and public_url from Settings,
and the step's subject and preheader from campaign.toml.

Layouts: `templates/emails/_layout.html.j2` and `_layout.txt.j2`, shared by every campaign. Step
templates `<campaign>/<step>.html.j2` and `.txt.j2` extend them and fill the `content` block.

`Renderer.render_reference` does the slow, obvious thing (render with the real values, then
inline); the tests prove the fast path gives the same bytes. Any template problem (syntax, unknown
variable, missing file, misuse of a per-patient variable) is a TemplateError naming the file and,
where there is one, the line: never a half-rendered email.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import jinja2
import premailer
from jinja2 import meta, nodes

from drip.campaigns import Campaign, Step
from drip.errors import TemplateError
from drip.settings import Settings

# Everything a template may use (the campaign linter checks against these).
PATIENT_VARIABLES = ("first_name", "last_name", "unsubscribe_url")
PROCESS_VARIABLES = (  # from Settings
    "clinic_name",
    "clinic_address",
    "clinic_phone",
    "clinic_route",
    "resources_url",
    "public_url",
)
STEP_VARIABLES = ("subject", "preheader")  # campaign.toml

# Lowercase letters and digits only: nothing for Jinja or lxml to escape, for lxml to percent-quote
# in an href, or for premailer to rewrite; no token is a prefix of another.
_TOKEN_PREFIX = "dripvar0"
_TOKENS = {name: f"{_TOKEN_PREFIX}{name.replace('_', '0')}0x" for name in PATIENT_VARIABLES}
_TOKEN_NAMES = {token: name for name, token in _TOKENS.items()}
_TOKEN_RE = re.compile("|".join(_TOKENS.values()))

# Presentational attributes premailer would derive from CSS are obsolete in HTML5 (the validator
# rejects them); the layout gives Outlook its width in a conditional comment instead.
_BASIC_ATTRIBUTES = ["align", "valign", "bgcolor", "width", "height"]

Escape = Callable[[str], str]


@dataclass(frozen=True)
class Rendered:
    """One email's content, ready to be wrapped in MIME."""

    subject: str
    preheader: str
    text: str
    html: str


@dataclass(frozen=True)
class _Compiled:
    """One part of one step cut at the per-patient variables: literals[i], slot i, literals[i+1]…"""

    literals: tuple[str, ...]
    slots: tuple[tuple[str, Escape], ...]

    def fill(self, values: Mapping[str, str]) -> str:
        out = [self.literals[0]]
        for (name, escape), literal in zip(self.slots, self.literals[1:], strict=True):
            out.append(escape(values[name]))
            out.append(literal)
        return "".join(out)


@dataclass(frozen=True)
class _Version:
    """A step compiled against one version of its files; stale once any of them changes."""

    files: tuple[tuple[str, int, int], ...]  # (path, mtime_ns, size)
    step: Step
    text: _Compiled
    html: _Compiled

    def is_current(self, step: Step) -> bool:
        if step != self.step:
            return False
        try:
            return all(_signature(file[0]) == file for file in self.files)
        except OSError:
            return False


class Renderer:
    """Renders campaign steps; keeps each step's compiled form until one of its files changes."""

    def __init__(self, settings: Settings) -> None:
        self._root = settings.templates_dir.resolve()
        self._process = {name: str(getattr(settings, name)) for name in PROCESS_VARIABLES}
        self._html_env = environment(self._root, autoescape=True)
        self._text_env = environment(self._root, autoescape=False)
        self._cache: dict[tuple[Path, str], _Version] = {}

    def render(self, campaign: Campaign, step_key: str, patient: Mapping[str, str]) -> Rendered:
        """The fast path: a dict lookup, a few stat calls and two string joins."""
        values = _patient_values(patient)
        version = self._version(campaign, step_key)
        return Rendered(
            subject=version.step.subject,
            preheader=version.step.preheader,
            text=version.text.fill(values),
            html=version.html.fill(values),
        )

    def render_reference(
        self, campaign: Campaign, step_key: str, patient: Mapping[str, str]
    ) -> Rendered:
        """The slow, obvious path the fast one must equal: render with real values, then inline."""
        step = campaign.step(step_key)
        html_name, text_name = template_names(campaign, step.key, self._root)
        context = self._context(step) | _patient_values(patient)
        html = self._render(self._html_env, html_name, context)
        return Rendered(
            subject=step.subject,
            preheader=step.preheader,
            text=self._render(self._text_env, text_name, context),
            html=_inline(html, html_name),
        )

    def _version(self, campaign: Campaign, step_key: str) -> _Version:
        step = campaign.step(step_key)
        key = (campaign.path, step.key)
        version = self._cache.get(key)
        if version is not None and version.is_current(step):
            return version
        version = self._compile(campaign, step)
        self._cache[key] = version
        return version

    def _compile(self, campaign: Campaign, step: Step) -> _Version:
        """Render with tokens, inline, cut: the ~10 ms of work done once per template version."""
        # Jinja's own reload check compares mtimes, which may not move within a coarse clock tick.
        _forget_compiled(self._html_env)
        _forget_compiled(self._text_env)
        html_name, text_name = template_names(campaign, step.key, self._root)
        files = _checked_files(self._html_env, html_name, self._root, html=True)
        files += _checked_files(self._text_env, text_name, self._root, html=False)
        context = self._context(step) | _TOKENS
        html = _inline(self._render(self._html_env, html_name, context), html_name)
        text = self._render(self._text_env, text_name, context)
        return _Version(
            files=tuple(dict.fromkeys(files)),
            step=step,
            text=_split(text, text_name, html=False),
            html=_split(html, html_name, html=True),
        )

    def _context(self, step: Step) -> dict[str, str]:
        return self._process | {"subject": step.subject, "preheader": step.preheader}

    def _render(self, env: jinja2.Environment, name: str, context: Mapping[str, str]) -> str:
        """Jinja's render, every failure turned into a TemplateError that says where."""
        try:
            return env.get_template(name).render(context)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(_syntax_message(e)) from e
        except jinja2.TemplateNotFound as e:
            raise TemplateError(_not_found_message(e, name, self._root)) from e
        except Exception as e:  # any failure inside template code is that template's error
            raise TemplateError(f"{_where(e, name)}: {type(e).__name__}: {e}") from e


def template_names(campaign: Campaign, step_key: str, root: Path) -> tuple[str, str]:
    """The HTML and text template names of a step, relative to the resolved templates dir `root`
    so that the layouts they extend resolve too; the renderer and the linter both use these.
    TemplateError if the campaign folder is not inside `root` (a symlink out of it, say)."""
    try:
        folder = campaign.path.resolve().relative_to(root).as_posix()
    except ValueError:
        raise TemplateError(
            f"campaign folder {campaign.path} is not inside the templates dir {root}"
        ) from None
    return f"{folder}/{step_key}.html.j2", f"{folder}/{step_key}.txt.j2"


def read_template(path: Path) -> str:
    """A template's text; a file that is not UTF-8 is a TemplateError naming it, not a crash."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(
            f"{path}: is not UTF-8 text (byte {e.start} is {e.object[e.start : e.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None


class _Loader(jinja2.FileSystemLoader):
    """FileSystemLoader that reads through read_template."""

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        try:
            return super().get_source(environment, template)
        except UnicodeDecodeError:
            for root in self.searchpath:
                read_template(Path(root) / template)
            raise


def environment(root: Path, *, autoescape: bool) -> jinja2.Environment:
    """The Jinja environment for templates under `root`: the renderer and the linter both use it,
    so a template parses the same (same whitespace control) wherever it is read."""
    return jinja2.Environment(
        loader=_Loader([root]),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _forget_compiled(env: jinja2.Environment) -> None:
    if env.cache is not None:
        env.cache.clear()


def _patient_values(patient: Mapping[str, str]) -> dict[str, str]:
    missing = [name for name in PATIENT_VARIABLES if name not in patient]
    if missing:
        raise TemplateError(f"no value for per-patient variable(s) {', '.join(missing)}")
    return {name: patient[name] for name in PATIENT_VARIABLES}


def _inline(html: str, name: str) -> str:
    """premailer with the settings both paths share: no network, classes kept for @media rules."""
    try:
        result: str = premailer.Premailer(
            html,
            keep_style_tags=False,  # rules that can't be inlined (@media) stay in <style>
            remove_classes=False,
            strip_important=False,
            disable_validation=True,
            disable_basic_attributes=_BASIC_ATTRIBUTES,
            allow_network=False,
            cssutils_logging_level=logging.CRITICAL,
        ).transform()
    except Exception as e:  # premailer raises whatever lxml, cssutils or cssselect raise
        raise TemplateError(f"{name}: inlining CSS failed: {type(e).__name__}: {e}") from e
    return result


# --- the per-patient-variable rule --------------------------------------------------------------


def _checked_files(
    env: jinja2.Environment, name: str, root: Path, *, html: bool
) -> list[tuple[str, int, int]]:
    """Check the rule in a template and everything it extends or includes; return their files."""
    files = []
    for filename, tree in _parsed(env, name, root):
        _check_patient_variables(tree, filename, html=html)
        files.append(_signature(filename))
    return files


def _parsed(env: jinja2.Environment, name: str, root: Path) -> Iterator[tuple[str, nodes.Template]]:
    """A template and every template it references, each parsed once."""
    assert env.loader is not None
    seen: set[str] = set()
    todo = [(name, name)]
    while todo:
        current, parent = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            source, filename, _ = env.loader.get_source(env, current)
            tree = env.parse(source, current, filename)
        except jinja2.TemplateNotFound as e:
            raise TemplateError(_not_found_message(e, parent, root)) from e
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(_syntax_message(e)) from e
        assert filename is not None
        yield filename, tree
        for referenced in meta.find_referenced_templates(tree):
            if referenced is None:
                raise TemplateError(
                    f"{filename}: extends or includes a computed name; use a literal"
                )
            todo.append((referenced, current))


def _check_patient_variables(tree: nodes.Template, filename: str, *, html: bool) -> None:
    """Raise unless every per-patient variable is plainly output (see the module docstring)."""
    allowed: set[int] = set()
    for output in tree.find_all(nodes.Output):
        for node in output.nodes:
            if html and isinstance(node, nodes.Filter) and node.name in ("e", "escape"):
                allowed.add(id(node.node))
            else:
                allowed.add(id(node))
    for name in tree.find_all(nodes.Name):
        if name.name in PATIENT_VARIABLES and id(name) not in allowed:
            raise TemplateError(
                f"{filename}, line {name.lineno}: {name.name} differs for each patient, so it may "
                f"only be output as {{{{ {name.name} }}}}; not tested, filtered, joined or assigned"
            )


# --- cutting a rendered part at the tokens -------------------------------------------------------


def _split(rendered: str, name: str, *, html: bool) -> _Compiled:
    literals, slots, start = [], [], 0
    for match in _TOKEN_RE.finditer(rendered):
        literals.append(rendered[start : match.start()])
        escape = _html_escape(rendered, match.start(), name) if html else _as_is
        slots.append((_TOKEN_NAMES[match.group()], escape))
        start = match.end()
    literals.append(rendered[start:])
    if any(_TOKEN_PREFIX in literal for literal in literals):
        raise TemplateError(f"{name}: a per-patient variable was altered on its way out")
    return _Compiled(tuple(literals), tuple(slots))


_OPEN_ATTRIBUTE = re.compile(
    r"""^<([A-Za-z][^\s/>]*)\s.*?([^\s"'=<>/]+)=(["'])(?:(?!\3).)*$""", re.S
)
_RAW_TEXT = re.compile(r"<(script|style)\b[^>]*>[^<]*$", re.I)


def _html_escape(document: str, index: int, name: str) -> Escape:
    """The escaping that makes a value come out exactly as lxml serialises it at this place.

    lxml writes text with &, < and > escaped and keeps ' and " as they are; attribute values also
    get &quot; (inside "…"); href/src/action (and name on <a>) are also percent-encoded for spaces
    and non-ASCII. Matching that, rather than markupsafe's &#39;, makes the fast path's bytes equal
    the reference render's.
    """
    before = document[:index]
    tag_start = before.rfind("<")
    if tag_start <= before.rfind(">"):
        if _RAW_TEXT.search(before):
            raise TemplateError(f"{name}: a per-patient variable inside <script> or <style>")
        return _escape_text
    found = _OPEN_ATTRIBUTE.match(before[tag_start:])
    if found is None:
        raise TemplateError(
            f"{name}: a per-patient variable outside text and quoted attribute values"
        )
    tag, attribute, quote_mark = (found.group(i).lower() for i in (1, 2, 3))
    is_uri = attribute in ("href", "src", "action") or (attribute, tag) == ("name", "a")
    escape_attribute = _escape_double_quoted if quote_mark == '"' else _escape_single_quoted
    return _uri(escape_attribute) if is_uri else escape_attribute


def _as_is(value: str) -> str:
    return value


def _escape_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_double_quoted(value: str) -> str:
    return _escape_text(value).replace('"', "&quot;")


def _escape_single_quoted(value: str) -> str:
    return _escape_text(value).replace("'", "&#39;")


# Every printable ASCII character but the space: libxml2 percent-encodes only spaces and non-ASCII.
_URI_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


def _uri(escape: Escape) -> Escape:
    def escape_uri(value: str) -> str:
        return escape(quote(value, safe=_URI_SAFE))

    return escape_uri


# --- files and error messages --------------------------------------------------------------------


def _signature(path: str) -> tuple[str, int, int]:
    """What tells a changed file: mtime alone can repeat within a coarse clock tick, size rarely."""
    stat = os.stat(path)
    return path, stat.st_mtime_ns, stat.st_size


def _syntax_message(e: jinja2.TemplateSyntaxError) -> str:
    return f"{e.filename or e.name}, line {e.lineno}: {e.message}"


def _not_found_message(e: jinja2.TemplateNotFound, wanted_by: str, root: Path) -> str:
    if e.name == wanted_by:
        return (
            f"{root / str(e.name)}: no such template; every step needs <step>.html.j2 and "
            "<step>.txt.j2 in its campaign folder"
        )
    return f"{wanted_by}: uses {e.name!r}, which is not in {root}"


def _where(error: BaseException, name: str) -> str:
    """File and line of the innermost template frame (Jinja rewrites tracebacks to show them)."""
    where = name
    tb = error.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".j2"):
            where = f"{filename}, line {tb.tb_lineno}"
        tb = tb.tb_next
    return where
