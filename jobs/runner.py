"""Running one job for one period: claim it, time it, retry store errors, log one summary.

Store errors (worker.retry's `is_transient`: a connection refused or dropped,
a lock or statement timeout, a deadlock) are worth retrying: the try is handed back
to arq as `Retry` with the shared exponential backoff, jittered. When the tries are
exhausted the run is recorded as `failed` with its reason, in `job_runs` and in arq's
result (the raised `JobFailed`). Any other exception is a bug or bad input that would
fail the same way again, so it fails the run at once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from arq import Retry

from jobs import ledger
from jobs.context import JobResources, resources
from worker.retry import Backoff, describe, is_transient

log = structlog.get_logger("jobs")


class JobFailed(Exception):
    """A run that ran out of tries; arq keeps it as the job's (failed) result."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Summary:
    """What a run did: rows read and written, plus job-specific figures for the log line."""

    rows_in: int = 0
    rows_out: int = 0
    details: dict[str, Any] = field(default_factory=dict)


JobBody = Callable[[JobResources], Awaitable[Summary]]


async def run_job(
    ctx: dict[str, Any], job: str, period: str, body: JobBody, *, force: bool = False
) -> dict[str, Any]:
    """Run `body` for (job, period) once; the returned dict is arq's result."""
    res = resources(ctx)
    cfg = res.settings.jobs
    job_try = int(ctx.get("job_try", 1))
    # A direct call (tests, `iotflow report`) has no arq job id; a fresh one never collides.
    job_id = str(ctx.get("job_id") or f"direct:{uuid.uuid4().hex}")
    bound = log.bind(job=job, period=period, attempt=job_try)
    started = time.monotonic()
    try:
        claimed = await ledger.claim(
            res.pool, job, period, job_id, force=force, stale_after_s=cfg.job_timeout_s + 60.0
        )
        if claimed is None:
            bound.info("jobs.skipped", reason="period already done or running elsewhere")
            return {"job": job, "period": period, "status": "skipped"}
        summary = await body(res)
        duration_ms = _elapsed_ms(started)
        await ledger.finish(
            res.pool,
            job,
            period,
            duration_ms=duration_ms,
            rows_in=summary.rows_in,
            rows_out=summary.rows_out,
            details=summary.details,
        )
    except Exception as exc:
        if is_transient(exc):
            raise await _after_store_error(
                res, bound, job, period, job_id, job_try, exc, _elapsed_ms(started)
            ) from exc
        reason = describe(exc)
        await _record(
            res, bound, job, period, job_id, final=True, duration_ms=_elapsed_ms(started), reason=reason
        )
        bound.error("jobs.failed", reason=reason, retried=False, exc_info=True)
        raise
    bound.info(
        "jobs.run",
        status="done",
        rows_in=summary.rows_in,
        rows_out=summary.rows_out,
        duration_ms=duration_ms,
        **summary.details,
    )
    return {
        "job": job,
        "period": period,
        "status": "done",
        "rows_in": summary.rows_in,
        "rows_out": summary.rows_out,
        "duration_ms": duration_ms,
        **summary.details,
    }


async def _after_store_error(
    res: JobResources,
    bound: Any,
    job: str,
    period: str,
    job_id: str,
    job_try: int,
    exc: BaseException,
    duration_ms: int,
) -> Exception:
    """Record the error; the exception to raise: `Retry` while tries remain, else `JobFailed`."""
    cfg = res.settings.jobs
    reason = describe(exc)
    final = job_try >= cfg.max_tries
    await _record(res, bound, job, period, job_id, final=final, duration_ms=duration_ms, reason=reason)
    if final:
        bound.error("jobs.failed", reason=reason, tries=job_try, duration_ms=duration_ms)
        return JobFailed(f"{job} {period}: gave up after {job_try} tries: {reason}")
    delay = Backoff(cfg.retry_backoff_s, cfg.retry_backoff_max_s).delay(job_try)
    bound.warning("jobs.retry", reason=reason, retry_in_s=round(delay, 2), tries_left=cfg.max_tries - job_try)
    return Retry(defer=delay)


async def _record(
    res: JobResources,
    bound: Any,
    job: str,
    period: str,
    job_id: str,
    *,
    final: bool,
    duration_ms: int,
    reason: str,
) -> None:
    """Best effort: the store that failed may be the one holding `job_runs`; arq's result remains."""
    try:
        await ledger.record_error(
            res.pool, job, period, job_id, final=final, duration_ms=duration_ms, reason=reason
        )
    except Exception as exc:
        bound.warning("jobs.record_failed", reason=describe(exc))


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
