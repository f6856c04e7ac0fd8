"""The `job_runs` table: who claimed a (job, period), and how its run ended.

A period whose run is `done` is never run again unless forced; one that is `running`
under another arq job id is left alone (a second scheduler got there first) unless it
has been running longer than a job may, which means its worker died. Forcing re-runs a
period that is done or failed, never one that is running (unless stale). An error is
recorded only on the row of the run that claimed it (same arq job id) and never over
`done`: a run whose claim failed does not mark another's live run `retrying` (claimable).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

_CLAIM = """
INSERT INTO job_runs (job, period, status, attempts, job_id, started_at)
VALUES ($1, $2, 'running', 1, $3, now())
ON CONFLICT (job, period) DO UPDATE
SET status = 'running', attempts = job_runs.attempts + 1, job_id = excluded.job_id,
    started_at = now(), finished_at = NULL, duration_ms = NULL, error = NULL
WHERE ($4 AND job_runs.status <> 'running')
   OR job_runs.status IN ('retrying', 'failed')
   OR (job_runs.status = 'running'
       AND (job_runs.job_id = excluded.job_id OR job_runs.started_at < now() - make_interval(secs => $5)))
RETURNING attempts
"""

_FINISH = """
UPDATE job_runs SET status = 'done', finished_at = now(), duration_ms = $3, rows_in = $4, rows_out = $5,
       details = $6::jsonb, error = NULL
WHERE job = $1 AND period = $2
"""

_RECORD_ERROR = """
INSERT INTO job_runs (job, period, status, attempts, job_id, started_at, finished_at, duration_ms, error)
VALUES ($1, $2, $3, 1, $4, now(), now(), $5, $6)
ON CONFLICT (job, period) DO UPDATE
SET status = excluded.status, finished_at = now(), duration_ms = excluded.duration_ms,
    error = excluded.error
WHERE job_runs.job_id = excluded.job_id AND job_runs.status <> 'done'
"""


@dataclass(frozen=True)
class JobRun:
    job: str
    period: str
    status: str
    attempts: int
    started_at: datetime
    finished_at: datetime | None
    duration_ms: int | None
    rows_in: int | None
    rows_out: int | None
    error: str | None


async def claim(
    pool: asyncpg.Pool, job: str, period: str, job_id: str, *, force: bool, stale_after_s: float
) -> int | None:
    """Take the period for this attempt; the attempt number, or None when it is not ours to run."""
    attempts: int | None = await pool.fetchval(_CLAIM, job, period, job_id, force, stale_after_s)
    return attempts


async def finish(
    pool: asyncpg.Pool,
    job: str,
    period: str,
    *,
    duration_ms: int,
    rows_in: int,
    rows_out: int,
    details: dict[str, Any],
) -> None:
    await pool.execute(_FINISH, job, period, duration_ms, rows_in, rows_out, orjson.dumps(details).decode())


async def record_error(
    pool: asyncpg.Pool, job: str, period: str, job_id: str, *, final: bool, duration_ms: int, reason: str
) -> None:
    """`retrying` while tries remain, `failed` (with the reason) when they are exhausted."""
    status = "failed" if final else "retrying"
    await pool.execute(_RECORD_ERROR, job, period, status, job_id, duration_ms, reason)


async def recent(pool: asyncpg.Pool, limit: int = 20, job: str | None = None) -> list[JobRun]:
    rows = await pool.fetch(
        "SELECT job, period, status, attempts, started_at, finished_at, duration_ms, rows_in, rows_out, "
        "error FROM job_runs WHERE $2::text IS NULL OR job = $2 ORDER BY started_at DESC LIMIT $1",
        limit,
        job,
    )
    return [JobRun(**dict(row)) for row in rows]


async def get(pool: asyncpg.Pool, job: str, period: str) -> JobRun | None:
    row = await pool.fetchrow(
        "SELECT job, period, status, attempts, started_at, finished_at, duration_ms, rows_in, rows_out, "
        "error FROM job_runs WHERE job = $1 AND period = $2",
        job,
        period,
    )
    return None if row is None else JobRun(**dict(row))
