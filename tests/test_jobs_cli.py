"""`iotflow jobs enqueue|run|status` and `iotflow report device`, as separate processes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import asyncpg
import orjson
import pytest

from jobs.commands import enqueue_now, enqueue_request
from worker.config import Settings
from worker.stores.redis import delete_matching

from .conftest import worker_env
from .helpers import iotflow_process, notify_socket
from .test_jobs_support import drop_arq_keys, insert_readings, utc, with_unique_queue

__all__ = ["drop_arq_keys"]
pytestmark = pytest.mark.usefixtures("drop_arq_keys")


async def iotflow(settings: Settings, *args: str) -> tuple[int, str]:
    env = {**worker_env(settings), "IOTFLOW_JOBS_QUEUE_NAME": settings.jobs.queue_name}
    async with iotflow_process(env, *args) as process:
        return await process.wait(60), process.output


async def test_backfill_is_enqueued_once_run_by_a_burst_worker_and_shown_in_status(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    settings = with_unique_queue(settings)
    await insert_readings(
        pg, settings, [(utc("2026-03-10 10:15"), 7, 1, 2.5), (utc("2026-03-10 10:45"), 7, 1, 3.5)]
    )
    backfill = ("jobs", "enqueue", "rollup", "--from", "2026-03-10T10:00Z", "--to", "2026-03-10T11:00Z")

    code, out = await iotflow(settings, *backfill)
    assert code == 0 and "enqueued" in out, out
    code, out = await iotflow(settings, *backfill)
    assert code == 1 and "already queued" in out, out
    code, out = await iotflow(settings, "jobs", "enqueue", "rollup", "--from", "2026-03-10T10:00Z")
    assert code == 2 and "both --from and --to" in out, out

    code, out = await iotflow(settings, "jobs", "run", "--burst", "--no-cron")
    assert code == 0, out
    row = await pg.fetchrow("SELECT count, avg FROM rollup_hourly WHERE bucket = '2026-03-10 10:00+00'")
    assert row is not None and row["count"] == 2 and row["avg"] == 3.0

    code, out = await iotflow(settings, "jobs", "status")
    assert code == 0, out
    line = next(line for line in out.splitlines() if " rollup " in line)
    assert "2026-03-10T10:00:00+00:00/2026-03-10T11:00:00+00:00" in line and " done " in line


async def test_report_device_prints_the_report_as_json(settings: Settings, pg: asyncpg.Connection) -> None:
    device_id = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'sim-json-01'")
    code, out = await iotflow(settings, "report", "device", str(device_id), "--period", "1d")
    assert code == 0, out
    report = orjson.loads(out[out.index("{") :])
    assert report["device_id"] == device_id and report["report_type"] == "device_health"
    assert report["metrics"]["total_data_points"] == 0 and report["metrics"]["uptime_percentage"] == 0.0

    code, out = await iotflow(settings, "report", "device", str(device_id), "--period", "last week")
    assert code == 2 and "neither a span" in out, out


async def test_the_jobs_runner_tells_systemd_it_is_ready_alive_and_stopping(
    settings: Settings, tmp_path: Path
) -> None:
    settings = with_unique_queue(settings)
    async with notify_socket(tmp_path / "notify.sock") as notify:
        env = {
            **worker_env(settings),
            "IOTFLOW_JOBS_QUEUE_NAME": settings.jobs.queue_name,
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": "200000",
        }
        async with iotflow_process(env, "jobs", "run", "--no-cron") as runner:
            await notify.wait_for_state("WATCHDOG=1")
            assert await runner.terminate(30) == 0, runner.output
        states = notify.read()  # all it sent, now that it has exited
    # Ready once its stores are open, then pings (every 0.1 s: test_sdnotify) until it stops.
    assert states[0] == "READY=1" and states[-1] == "STOPPING=1", states
    assert len(states) >= 3 and set(states[1:-1]) == {"WATCHDOG=1"}, states


async def test_two_deployments_sharing_a_redis_each_get_their_own_jobs_queue(settings: Settings) -> None:
    """The key prefix keeps deployments apart, the jobs' queue and job ids included."""
    first = replace(settings, jobs=replace(settings.jobs, queue_name=""))
    second = replace(first, redis=replace(first.redis, key_prefix=f"{first.redis.key_prefix}other:"))
    assert first.jobs_queue != second.jobs_queue
    assert first.jobs_queue.startswith(first.redis.key_prefix)
    request = enqueue_request(
        first, "rollup", utc("2026-01-01 00:00"), utc("2026-01-01 02:00"), None, None, False
    )
    try:
        assert await enqueue_now(first, request, 0) == 0
        assert await enqueue_now(second, request, 0) == 0  # not "already queued" by the other one
        assert await enqueue_now(first, request, 0) == 1  # the same deployment twice still is
    finally:
        await delete_matching(settings.redis, f"*{first.redis.key_prefix}*")
    explicit = replace(first, jobs=replace(first.jobs, queue_name="site-a:jobs"))
    assert explicit.jobs_queue == "site-a:jobs"
