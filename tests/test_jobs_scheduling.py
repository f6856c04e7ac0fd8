"""Scheduling on a real arq Worker: due periods, one run per period, retries, recorded failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest
from arq import create_pool
from arq.connections import ArqRedis
from arq.constants import result_key_prefix
from arq.jobs import Job

from jobs import ledger, tasks
from jobs.context import JobResources, open_resources
from jobs.runner import JobFailed
from jobs.schedule import due_jobs, enqueue, job_id, schedule_tick
from jobs.worker import build_worker, redis_settings
from worker.config import JobsSettings, Settings

from .test_jobs_support import Clock, ctx_of, drop_arq_keys, res, utc, with_unique_queue

__all__ = ["drop_arq_keys", "res"]

NOW = utc("2026-03-10 03:40")

# arq's Worker.close calls redis-py's deprecated close(); nothing of ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning"),
    pytest.mark.usefixtures("drop_arq_keys"),
]


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
async def arq_pool(settings: Settings) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(redis_settings(settings))
    yield pool
    await pool.aclose()


async def run_burst(settings: Settings, clock: Clock, *, cron_jobs: bool = False) -> tuple[int, int, int]:
    """One arq worker in burst mode until the queue is empty; (complete, retried, failed)."""
    pool = await create_pool(redis_settings(settings), default_queue_name=settings.jobs.queue_name)
    worker = build_worker(
        settings,
        burst=True,
        handle_signals=False,
        redis_pool=pool,
        cron_jobs=cron_jobs,
        clock=clock,
        poll_delay=0.05,
    )
    try:
        await asyncio.wait_for(worker.async_run(), 30)
    finally:
        await worker.close()
    return worker.jobs_complete, worker.jobs_retried, worker.jobs_failed


def test_each_job_is_due_for_its_latest_started_period() -> None:
    cfg = JobsSettings()  # rollup at :05, reports 01:15, retention 03:30, sweep every minute

    def due(now: str) -> dict[str, str]:
        return {item.function: item.period.isoformat() for item in due_jobs(cfg, utc(now))}

    assert due("2026-03-10 01:10:30") == {
        "rollup": "2026-03-10T01:00:00+00:00",
        "device_health": "2026-03-08T00:00:00+00:00",  # the 9th's report is due at 01:15
        "retention": "2026-03-09T00:00:00+00:00",
        "offline_sweep": "2026-03-10T01:10:00+00:00",
    }
    assert due("2026-03-10 01:04:59")["rollup"] == "2026-03-10T00:00:00+00:00"
    assert due("2026-03-10 01:15")["device_health"] == "2026-03-09T00:00:00+00:00"
    assert due("2026-03-10 03:30")["retention"] == "2026-03-10T00:00:00+00:00"
    five = replace(cfg, sweep_every_min=5, reports_enabled=False)
    assert {item.function: item.period for item in due_jobs(five, utc("2026-03-10 01:14"))} == {
        "rollup": utc("2026-03-10 01:00"),
        "retention": utc("2026-03-09 00:00"),
        "offline_sweep": utc("2026-03-10 01:10"),
    }


async def test_two_schedulers_and_two_workers_run_each_period_once(
    settings: Settings, pg: asyncpg.Connection, arq_pool: ArqRedis, clock: Clock
) -> None:
    settings = with_unique_queue(settings)
    queue = settings.jobs.queue_name
    async with open_resources(settings, clock=clock) as res:
        ctx = ctx_of(res, redis=arq_pool)
        first = await schedule_tick(ctx)
        second = await schedule_tick(ctx)  # another scheduler, the same minute
        expected = {
            job_id(queue, "rollup", "2026-03-10T03:00:00+00:00"),
            job_id(queue, "device_health", "2026-03-09T00:00:00+00:00"),
            job_id(queue, "retention", "2026-03-10T00:00:00+00:00"),
            job_id(queue, "offline_sweep", "2026-03-10T03:40:00+00:00"),
        }
        assert set(first["enqueued"]) == expected and first["already"] == []
        assert second["enqueued"] == [] and set(second["already"]) == expected

        # Two workers, each with its own cron tick scheduling the same periods again.
        await asyncio.gather(
            run_burst(settings, clock, cron_jobs=True), run_burst(settings, clock, cron_jobs=True)
        )

        runs = await pg.fetch("SELECT job, status, attempts FROM job_runs ORDER BY job")
        assert [tuple(row) for row in runs] == [
            ("device_health", "done", 1),
            ("offline_sweep", "done", 1),
            ("retention", "done", 1),
            ("rollup", "done", 1),
        ]
        for ident in expected:
            info = await Job(ident, arq_pool).result_info()
            assert info is not None and info.success and info.result["status"] == "done"

        # arq refuses the ids while it keeps their results ...
        assert (await schedule_tick(ctx))["enqueued"] == []
        # ... and once it has forgotten them, job_runs refuses the periods already done.
        await arq_pool.delete(*(result_key_prefix + ident for ident in expected))
        assert set((await schedule_tick(ctx))["enqueued"]) == expected
        await run_burst(settings, clock)
        for ident in expected:
            info = await Job(ident, arq_pool).result_info()
            assert info is not None and info.result["status"] == "skipped"
        assert await pg.fetchval("SELECT max(attempts) FROM job_runs") == 1


async def test_a_job_failing_on_a_store_error_is_retried_then_recorded_as_failed(
    settings: Settings, pg: asyncpg.Connection, arq_pool: ArqRedis, clock: Clock
) -> None:
    settings = with_unique_queue(settings, max_tries=3, retry_backoff_s=0.05, lock_timeout_s=0.2)
    queue = settings.jobs.queue_name
    period = "2026-03-10T00:00:00+00:00/2026-03-10T02:00:00+00:00"
    job = await enqueue(arq_pool, queue, "rollup", period, start="2026-03-10T00:00Z", end="2026-03-10T02:00Z")
    assert job is not None

    # Someone holds the raw table locked (say, a long migration): every try times out on the lock.
    async with pg.transaction():
        await pg.execute("LOCK TABLE decoded_data IN ACCESS EXCLUSIVE MODE")
        complete, retried, failed = await run_burst(settings, clock)

    assert (complete, retried, failed) == (0, 2, 1)
    info = await job.result_info()
    assert info is not None and not info.success
    assert isinstance(info.result, JobFailed)
    assert "gave up after 3 tries" in info.result.reason and "lock timeout" in info.result.reason
    row = await pg.fetchrow(
        "SELECT status, attempts, error FROM job_runs WHERE job = $1 AND period = $2", tasks.ROLLUP, period
    )
    assert row is not None
    assert row["status"] == "failed" and row["attempts"] == 3
    assert row["error"].startswith("LockNotAvailableError") and "lock timeout" in row["error"]

    # With the lock gone, a forced re-run of the period succeeds.
    again = await enqueue(
        arq_pool,
        queue,
        "rollup",
        f"{period}:again",
        start="2026-03-10T00:00Z",
        end="2026-03-10T02:00Z",
        force=True,
    )
    assert again is not None
    assert await run_burst(settings, clock) == (1, 0, 0)
    assert await pg.fetchval("SELECT status FROM job_runs WHERE period = $1", period) == "done"


async def test_force_does_not_take_a_period_another_worker_is_running(
    pg: asyncpg.Connection, res: JobResources
) -> None:
    period = "2026-03-10T03:00:00+00:00"
    assert await ledger.claim(res.pool, "rollup", period, "a", force=False, stale_after_s=3660) == 1
    # A forced second run of the same period while the first still runs: refused.
    assert await ledger.claim(res.pool, "rollup", period, "b", force=True, stale_after_s=3660) is None
    row = await pg.fetchrow("SELECT status, job_id FROM job_runs WHERE period = $1", period)
    assert row is not None and tuple(row) == ("running", "a")
    # Once it is done, forcing runs it again; a running row gone stale is taken over too.
    await ledger.finish(res.pool, "rollup", period, duration_ms=1, rows_in=0, rows_out=0, details={})
    assert await ledger.claim(res.pool, "rollup", period, "b", force=True, stale_after_s=3660) == 2
    await pg.execute("UPDATE job_runs SET started_at = now() - interval '2 hours'")
    assert await ledger.claim(res.pool, "rollup", period, "c", force=True, stale_after_s=3660) == 3


async def test_an_error_of_a_run_that_did_not_claim_the_period_leaves_its_row_alone(
    pg: asyncpg.Connection, res: JobResources
) -> None:
    period = "2026-03-10T03:00:00+00:00"

    async def row() -> tuple[str, str | None]:
        found = await pg.fetchrow("SELECT status, job_id FROM job_runs WHERE period = $1", period)
        assert found is not None
        return found["status"], found["job_id"]

    await ledger.claim(res.pool, "rollup", period, "a", force=False, stale_after_s=3660)
    # Run b's claim hit a store error while a runs: a's row stays running, so no third run.
    await ledger.record_error(res.pool, "rollup", period, "b", final=False, duration_ms=1, reason="x")
    assert await row() == ("running", "a")
    assert await ledger.claim(res.pool, "rollup", period, "c", force=False, stale_after_s=3660) is None
    # Nor does it turn a done period into a retrying (claimable) one.
    await ledger.finish(res.pool, "rollup", period, duration_ms=1, rows_in=0, rows_out=0, details={})
    await ledger.record_error(res.pool, "rollup", period, "b", final=True, duration_ms=1, reason="x")
    assert await row() == ("done", "a")
    # The run's own errors are recorded, as is an error on a period nobody had claimed yet.
    await ledger.claim(res.pool, "rollup", period, "d", force=True, stale_after_s=3660)
    await ledger.record_error(res.pool, "rollup", period, "d", final=False, duration_ms=1, reason="x")
    assert await row() == ("retrying", "d")
    other = "2026-03-10T04:00:00+00:00"
    await ledger.record_error(res.pool, "rollup", other, "e", final=False, duration_ms=1, reason="x")
    assert await pg.fetchval("SELECT status FROM job_runs WHERE period = $1", other) == "retrying"
