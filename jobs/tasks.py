"""The arq job functions. Each names its (job, period) and hands the work to `run_job`.

Arguments are plain strings (ISO times), so jobs enqueued by one version of the CLI or
scheduler stay readable by another worker. Every function can also be called directly
with a ctx dict holding the resources (tests, `iotflow report`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from jobs.cassandra_rollups import CassandraRollupCounts, CassandraRollups
from jobs.context import JobResources
from jobs.periods import DAY, floor_day, floor_hour, iso, parse_time
from jobs.reports import build_reports, store_reports
from jobs.retention import apply_retention
from jobs.rollups import RollupCounts, rollup_incremental, rollup_range
from jobs.runner import Summary, run_job
from jobs.sweep import sweep_offline

ROLLUP = "rollup"
DEVICE_HEALTH = "device_health"
RETENTION = "retention"
OFFLINE_SWEEP = "offline_sweep"


def _rollup_summary(counts: RollupCounts, **details: Any) -> Summary:
    return Summary(
        rows_in=counts.readings,
        rows_out=counts.hourly_rows + counts.daily_rows,
        details={
            "hours": counts.hours,
            "days": counts.days,
            "hourly_rows": counts.hourly_rows,
            "daily_rows": counts.daily_rows,
            # Before the raw horizon (raw data retention removed): kept as they are.
            "skipped_hours": counts.skipped_hours,
            "skipped_days": counts.skipped_days,
            **details,
        },
    )


def _cassandra(res: JobResources) -> CassandraRollups:
    assert res.cassandra is not None
    return CassandraRollups(res.settings, res.pool, res.cassandra)


def _cassandra_details(counts: CassandraRollupCounts) -> dict[str, Any]:
    """aggregated_data's figures beside the PostgreSQL ones, in the same summary."""
    return {
        "cassandra": {
            "hours": counts.hours,
            "days": counts.days,
            "readings": counts.readings,
            "hourly_rows": counts.hourly_rows,
            "daily_rows": counts.daily_rows,
        }
    }


async def rollup(
    ctx: dict[str, Any],
    period: str | None = None,
    *,
    start: str | None = None,
    end: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Scheduled: `period` is the hour that just began; every closed hour before it is rolled up
    incrementally. Backfill: `start` and `end` give the range, recomputed whole except what
    lies before the oldest raw data retention kept (skipped, counted, rollups left as they are)."""
    if start is not None and end is not None:
        first, last = parse_time(start), parse_time(end)

        async def backfill(res: JobResources) -> Summary:
            counts = await rollup_range(res.pool, first, last)
            extra = {}
            if res.cassandra is not None:
                extra = _cassandra_details(await _cassandra(res).run_range(first, last))
            return _rollup_summary(counts, mode="backfill", **extra)

        return await run_job(ctx, ROLLUP, f"{iso(first)}/{iso(last)}", backfill, force=force)
    if period is None:
        raise ValueError("rollup needs a period or a start and an end")
    until = floor_hour(parse_time(period))

    async def incremental(res: JobResources) -> Summary:
        late = timedelta(seconds=res.settings.jobs.late_window_s)
        counts = await rollup_incremental(res.pool, until, late)
        extra = {}
        if res.cassandra is not None:
            extra = _cassandra_details(await _cassandra(res).run_incremental(until, late))
        return _rollup_summary(counts, mode="incremental", **extra)

    return await run_job(ctx, ROLLUP, iso(until), incremental, force=force)


async def device_health(
    ctx: dict[str, Any], period: str, *, device_id: int | None = None, force: bool = False
) -> dict[str, Any]:
    """Reports for the UTC day starting at `period`, for every device or just `device_id`."""
    start = floor_day(parse_time(period))
    ids = None if device_id is None else [device_id]

    async def body(res: JobResources) -> Summary:
        reports = await build_reports(res, start, start + DAY, ids)
        await store_reports(res, reports)
        points = sum(report["metrics"]["total_data_points"] for report in reports)
        return Summary(rows_in=points, rows_out=len(reports), details={"devices": len(reports)})

    key = iso(start) if device_id is None else f"{iso(start)}:device:{device_id}"
    return await run_job(ctx, DEVICE_HEALTH, key, body, force=force)


async def retention(ctx: dict[str, Any], period: str, *, force: bool = False) -> dict[str, Any]:
    """Once per day (`period`); ages are measured from the time it actually runs."""

    async def body(res: JobResources) -> Summary:
        removed = await apply_retention(res, res.clock())
        return Summary(
            rows_out=sum(item.rows for item in removed),
            details={
                "removed": {item.kind: item.rows for item in removed},
                "partitions": [name for item in removed for name in item.partitions],
            },
        )

    return await run_job(ctx, RETENTION, iso(floor_day(parse_time(period))), body, force=force)


async def offline_sweep(ctx: dict[str, Any], period: str, *, force: bool = False) -> dict[str, Any]:
    """One sweep per slot (`period`); silence is measured from the time it actually runs."""

    async def body(res: JobResources) -> Summary:
        result = await sweep_offline(res, res.clock())
        return Summary(
            rows_in=result.silent,
            rows_out=len(result.marked),
            # The ids are capped: after a broker outage thousands may go at once.
            details={
                "marked_offline": len(result.marked),
                "devices": result.marked[:100],
                "events": result.events,
            },
        )

    return await run_job(ctx, OFFLINE_SWEEP, iso(parse_time(period)), body, force=force)


FUNCTIONS = (rollup, device_health, retention, offline_sweep)
