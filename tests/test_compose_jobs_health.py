"""The healthcheck docker-compose.yml gives the jobs runners (`arq --check` on the key the
runner renews in Redis) tells a running runner from none, against the real services."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path

import pytest

from worker.config import Settings

from .conftest import worker_env
from .helpers import iotflow_process
from .test_jobs_support import drop_arq_keys, with_unique_queue

__all__ = ["drop_arq_keys"]
pytestmark = pytest.mark.usefixtures("drop_arq_keys")
ROOT = Path(__file__).parent.parent


def _jobs_healthcheck() -> list[str]:
    compose = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    block = re.search(r"(?m)^x-iotflow-jobs-health: &iotflow-jobs-health\n  test: (\[.*\])$", compose)
    assert block is not None, "no jobs healthcheck in docker-compose.yml"
    test = json.loads(block.group(1))
    assert test[0] == "CMD", test
    # The image puts its venv's bin first on PATH; here it is this interpreter's.
    return [str(Path(sys.executable).parent / test[1]), *test[2:]]


async def _check(env: dict[str, str]) -> int:
    process = await asyncio.create_subprocess_exec(
        *_jobs_healthcheck(),
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 60)


async def test_the_jobs_healthcheck_is_unhealthy_without_a_runner_and_healthy_with_one(
    settings: Settings,
) -> None:
    settings = with_unique_queue(settings)
    env = {**worker_env(settings), "IOTFLOW_JOBS_QUEUE_NAME": settings.jobs.queue_name}
    assert await _check(env) == 1  # nothing runs on this queue yet
    async with iotflow_process(env, "jobs", "run", "--no-cron") as runner:
        deadline = time.monotonic() + 60
        while await _check(env) != 0:
            assert runner.process.returncode is None, runner.output
            assert time.monotonic() < deadline, "the runner never became healthy"
            await asyncio.sleep(0.5)
        assert await runner.terminate(30) == 0, runner.output
