"""What the `iotflow jobs enqueue|status` and `iotflow report` commands do, once parsed."""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from arq import create_pool

from jobs import ledger, tasks
from jobs.context import open_resources
from jobs.periods import (
    DAY,
    floor_day,
    floor_hour,
    floor_minutes,
    iso,
    parse_report_period,
    utc_now,
)
from jobs.reports import build_reports, store_reports
from jobs.schedule import job_id
from jobs.worker import redis_settings
from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.stores.devices import find_device_id

_FUNCTIONS = {
    "rollup": tasks.ROLLUP,
    "report": tasks.DEVICE_HEALTH,
    "retention": tasks.RETENTION,
    "sweep": tasks.OFFLINE_SWEEP,
}


@dataclass
class EnqueueRequest:
    function: str
    period: str  # what the job id is keyed by
    kwargs: dict[str, Any] = field(default_factory=dict)
    id_suffix: str = ""


def enqueue_request(
    settings: Settings,
    job: str,
    start: datetime | None,
    end: datetime | None,
    day: datetime | None,
    device: int | None,
    force: bool,
) -> EnqueueRequest:
    now = utc_now()
    function = _FUNCTIONS[job]
    if job == "rollup" and (start or end):
        if not (start and end):
            raise ValueError("a rollup backfill needs both --from and --to")
        first, last = start, end
        if last <= first:
            raise ValueError("--to must be after --from")
        request = EnqueueRequest(
            function, f"{iso(first)}/{iso(last)}", {"start": iso(first), "end": iso(last)}
        )
    elif job == "rollup":
        request = EnqueueRequest(function, iso(floor_hour(now)), {"period": iso(floor_hour(now))})
    elif job == "report":
        first = floor_day(day) if day else floor_day(now) - DAY
        key = iso(first) if device is None else f"{iso(first)}:device:{device}"
        request = EnqueueRequest(function, key, {"period": iso(first), "device_id": device})
    elif job == "retention":
        request = EnqueueRequest(function, iso(floor_day(now)), {"period": iso(floor_day(now))})
    else:
        slot = floor_minutes(now, settings.jobs.sweep_every_min)
        request = EnqueueRequest(function, iso(slot), {"period": iso(slot)})
    if force:
        # A fresh id: arq refuses the plain one while it keeps that period's result.
        request.kwargs["force"] = True
        request.id_suffix = f":force:{uuid.uuid4().hex[:8]}"
    return request


async def enqueue_now(settings: Settings, request: EnqueueRequest, wait_s: float) -> int:
    queue = settings.jobs_queue
    redis = await create_pool(redis_settings(settings), default_queue_name=queue)
    try:
        ident = job_id(queue, request.function, request.period) + request.id_suffix
        job = await redis.enqueue_job(request.function, _job_id=ident, _queue_name=queue, **request.kwargs)
        if job is None:
            print(f"already queued, running or recently done: {ident} (use --force to run it again)")
            return ExitCode.FAILURE
        print(f"enqueued {ident}")
        if wait_s > 0:
            result = await job.result(timeout=wait_s)
            print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return ExitCode.OK
    finally:
        await redis.aclose()


async def print_status(settings: Settings, limit: int, job: str | None) -> int:
    async with open_resources(settings) as res:
        runs = await ledger.recent(res.pool, limit, job)
    for run in runs:
        took = "" if run.duration_ms is None else f" {run.duration_ms} ms"
        counts = "" if run.rows_in is None else f" in={run.rows_in} out={run.rows_out}"
        error = f" error={run.error}" if run.error else ""
        print(
            f"{run.started_at:%Y-%m-%d %H:%M:%S} {run.job:<14} {run.period:<32} {run.status:<8}"
            f" tries={run.attempts}{took}{counts}{error}"
        )
    return ExitCode.OK


async def report_device(settings: Settings, device: str, period: str) -> int:
    """Compute the report now and print it; a calendar-day report is stored like the daily job's.
    `device` is a device id, key or MAC (UnknownDevice when it names none)."""
    async with open_resources(settings) as res:
        device_id = await find_device_id(res.pool, device)
        start, end = parse_report_period(period, res.clock())
        reports = await build_reports(res, start, end, [device_id])
        if not reports:
            print(f"iotflow report: device {device} did not exist yet in that period", file=sys.stderr)
            return ExitCode.FAILURE
        if end - start == DAY and start == floor_day(start):
            await store_reports(res, reports)
        print(orjson.dumps(reports[0], option=orjson.OPT_INDENT_2).decode())
        return ExitCode.OK
