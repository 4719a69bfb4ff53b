"""Where the files drip ships live: inside the package once installed from a wheel, at the top of
the checkout when run from it (or from an editable install), where the developers' guide keeps
them. pyproject.toml maps `migrations/` to `drip/_migrations` and `templates/` to
`drip/_templates` in the wheel."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """The shipped directory `name` ("migrations" or "templates"): the wheel's copy if there is
    one, else the checkout's (a stray top-level `migrations` in site-packages is never looked at
    when the package has its own)."""
    installed = PACKAGE / f"_{name}"
    return installed if installed.is_dir() else PACKAGE.parent / name


MIGRATIONS = shipped("migrations")
TEMPLATES = shipped("templates") / "emails"
WEB_TEMPLATES = shipped("templates") / "web"  # the pages of `drip serve`, and their CSS
