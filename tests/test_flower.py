"""Flower, as operators run it (`celery -A worker flower`, with a login): it lists a real
`drip worker` and the tasks it ran, over the real Redis broker, and shows ids, never a patient."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import Result

from tests.conftest import ROOT
from tests.polling import wait_until
from tests.test_pipeline import Pipeline, enrol_csv, pipeline, redis_url  # noqa: F401

pytestmark = pytest.mark.slow
LOGIN = "operator:flower-test-password"


class Flower:
    """A `celery -A worker flower` process on a port the kernel picks, on loopback."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        shutil.copy(ROOT / "worker.py", workdir)  # as in the image: worker.py in the working dir
        self.log = workdir / "flower.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker", "flower"]
                + ["--address=127.0.0.1", "--port=0", "--inspect_timeout=10000"],
                cwd=workdir,
                env=env | {"FLOWER_BASIC_AUTH": LOGIN},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.port = wait_until(self._listening, "Flower to listen", describe=self.logs)

    def _listening(self) -> int | None:
        assert self.process.poll() is None, self.logs()
        for c in psutil.Process(self.process.pid).net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN:
                return int(c.laddr.port)
        return None

    def logs(self) -> str:
        return self.log.read_text()[-3000:]

    def get(self, path: str, login: str | None = LOGIN) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if login:
            request.add_header(
                "Authorization", f"Basic {base64.b64encode(login.encode()).decode()}"
            )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def flower(pipeline: Pipeline, tmp_path: Path) -> Iterator[Flower]:  # noqa: F811
    workdir = tmp_path / "app"
    workdir.mkdir()
    running = Flower(workdir, pipeline.env)
    try:
        yield running
    finally:
        running.stop()


# Flower reads the broker only: one database kind is enough.
@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_flower_lists_the_drip_worker_and_the_tasks_it_ran_with_ids_only(
    drip: Callable[..., Result],
    pipeline: Pipeline,  # noqa: F811
    flower: Flower,
) -> None:
    enrol_csv(drip, pipeline, ["zoe.flower@example.com,Zoë,America/New_York,"])
    pipeline.worker("w1")
    pipeline.beat()

    def workers() -> list[str]:
        return [name for name in flower.get("/api/workers?refresh=1") if name.startswith("w1@")]

    (name,) = wait_until(workers, "Flower to list worker w1", describe=flower.logs)
    assert flower.get("/api/workers")[name]["registered"] == ["drip.send_batch", "drip.tick"]
    pipeline.wait_for_messages(1)

    def sent_batches() -> list[dict[str, Any]]:
        tasks = flower.get("/api/tasks").values()
        return [t for t in tasks if t["name"] == "drip.send_batch" and t["state"] == "SUCCESS"]

    (batch,) = wait_until(sent_batches, "Flower to show the batch", describe=flower.logs)
    assert batch["worker"] == name
    assert batch["args"] == "[[1]]"  # one delivery id
    everything = json.dumps(flower.get("/api/tasks")) + json.dumps(flower.get("/api/workers"))
    everything += json.dumps(flower.get("/api/tasks"), ensure_ascii=False)
    for personal in ("zoe.flower", "Zoë", "Zo\\u00eb"):
        assert personal not in everything
    for login in (None, "operator:guess"):  # the API wants Flower's login
        with pytest.raises(urllib.error.HTTPError) as refused:
            flower.get("/api/tasks", login=login)
        refused.value.close()
        assert refused.value.code == 401
