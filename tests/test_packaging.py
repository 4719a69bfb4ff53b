"""The wheel, installed into a fresh virtualenv outside the checkout, works on its own: it
carries its migrations and the shipped campaign (pyproject.toml, drip/paths.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVE_CHECK = """
from drip.web import create_app
client = create_app().test_client()
bad = client.get("/unsubscribe/not-a-token")
assert "This link does not work" in bad.text and "--accent: #2f6f62;" in bad.text, bad.text
print(client.get("/healthz").status_code, bad.status_code, client.options("/healthz").status_code)
"""


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_installed_wheel_migrates_enrols_and_previews_outside_the_checkout(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    wheels = tmp_path / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(wheels)],
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("drip-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "install", "-q", str(wheel)], cwd=tmp_path)
    installed = time.monotonic()

    home = tmp_path / "clinic"
    home.mkdir()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "DRIP_DATABASE_URL": f"sqlite:///{home / 'drip.db'}",
        "DRIP_SECRET_KEY": "packaging-test-key-0123456789abcdef",
        "DRIP_MAIL_URL": f"file://{home / 'outbox'}",
    }
    drip = str(venv / "bin" / "drip")
    where = _run(
        [str(venv / "bin" / "python"), "-c", "import drip; print(drip.__file__)"], cwd=home, env=env
    )
    assert Path(where.strip()).is_relative_to(venv) and not Path(where.strip()).is_relative_to(ROOT)
    _run([drip, "db", "upgrade"], cwd=home, env=env)
    _run(
        [
            drip,
            "enroll",
            "a@example.com",
            "--campaign",
            "ketamine-onboarding",
            "--first-name",
            "Ann",
        ],
        cwd=home,
        env=env,
    )
    preview = _run(
        [drip, "preview", "ketamine-onboarding", "welcome", "--format", "text"], cwd=home, env=env
    )
    assert "Welcome to Lakeside Wellness Clinic" in preview
    pages = _run(  # drip serve's pages and stylesheet come from the wheel too
        [str(venv / "bin" / "python"), "-c", SERVE_CHECK], cwd=home, env=env
    )
    assert pages.split() == ["200", "404", "200"], pages
    print(
        f"build+venv+install {installed - started:.1f}s, commands "
        f"{time.monotonic() - installed:.1f}s"
    )
