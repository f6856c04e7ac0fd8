"""The schedule: which (job, period) is due now, and enqueueing it under a stable job id.

An arq cron tick runs every minute on every worker; it enqueues the latest due period of
each enabled job with the id `{queue}:{job}:{period}`. arq refuses an id that is queued,
running or whose result it still keeps, so two workers' ticks, a tick repeated within the
period, and a retry all end up as one run; `job_runs` then refuses a period already done
once arq has forgotten the id. Because each tick looks at what is due rather than at the
exact minute, a worker that was down at :05 still starts the hour's rollup at :06.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from arq.connections import ArqRedis
from arq.jobs import Job

from jobs import tasks
from jobs.context import resources
from jobs.periods import DAY, HOUR, floor_day, floor_hour, floor_minutes, iso
from worker.config import JobsSettings

log = structlog.get_logger("jobs.schedule")


@dataclass(frozen=True)
class Due:
    function: str
    period: datetime


def due_jobs(cfg: JobsSettings, now: datetime) -> list[Due]:
    """The latest period of each enabled job whose start time has passed."""
    due = []
    if cfg.rollups_enabled:
        hour = floor_hour(now)
        if now < hour + timedelta(minutes=cfg.rollup_minute):
            hour -= HOUR
        due.append(Due(tasks.ROLLUP, hour))
    if cfg.reports_enabled:
        # The report of day D runs on D + 1 at report_hour:report_minute.
        day = floor_day(now) - DAY
        if now < floor_day(now) + timedelta(hours=cfg.report_hour, minutes=cfg.report_minute):
            day -= DAY
        due.append(Due(tasks.DEVICE_HEALTH, day))
    if cfg.retention_enabled:
        day = floor_day(now)
        if now < day + timedelta(hours=cfg.retention_hour, minutes=cfg.retention_minute):
            day -= DAY
        due.append(Due(tasks.RETENTION, day))
    if cfg.sweep_enabled:
        due.append(Due(tasks.OFFLINE_SWEEP, floor_minutes(now, cfg.sweep_every_min)))
    return due


def job_id(queue_name: str, function: str, period: str) -> str:
    """arq job ids are global to the Redis database, so the queue name keeps deployments apart."""
    return f"{queue_name}:{function}:{period}"


async def enqueue(redis: ArqRedis, queue_name: str, function: str, key: str, /, **kwargs: Any) -> Job | None:
    """Enqueue `function` for the period `key` under its stable id; None when that id is taken."""
    return await redis.enqueue_job(
        function,
        _job_id=job_id(queue_name, function, key),
        _queue_name=queue_name,
        **kwargs,
    )


async def schedule_tick(ctx: dict[str, Any]) -> dict[str, list[str]]:
    """arq cron: enqueue whatever is due; returns the ids enqueued now and those already taken."""
    res = resources(ctx)
    redis: ArqRedis = ctx["redis"]
    queue = res.settings.jobs_queue
    enqueued: list[str] = []
    taken: list[str] = []
    for item in due_jobs(res.settings.jobs, res.clock()):
        period = iso(item.period)
        job = await enqueue(redis, queue, item.function, period, period=period)
        (enqueued if job is not None else taken).append(job_id(queue, item.function, period))
    if enqueued:
        log.info("jobs.scheduled", enqueued=enqueued, already=len(taken))
    return {"enqueued": enqueued, "already": taken}
