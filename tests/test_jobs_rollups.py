"""Hourly and daily rollups against hand-computed aggregates: late data, re-runs, backfill."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from jobs import ledger, tasks
from jobs.context import JobResources
from jobs.retention import drop_raw_before
from jobs.rollups import read_watermark
from worker.config import Settings

from .test_jobs_support import Clock, clock, ctx_of, insert_readings, res, utc

__all__ = ["clock", "res"]  # fixtures used by name below

DEVICE, TEMP, HUM = 7, 1, 2

# Hour 10: temp 1, 4, 2 (last at 10:59:59); hum 5. Hour 11: temp 10, NULL (left out), -3.
# Hour 12 is still open at 12:10 and must not be rolled up; 12:00:00 belongs to hour 12.
READINGS = [
    (utc("2026-03-10 10:00:00"), DEVICE, TEMP, 1.0),
    (utc("2026-03-10 10:20:00"), DEVICE, TEMP, 4.0),
    (utc("2026-03-10 10:59:59"), DEVICE, TEMP, 2.0),
    (utc("2026-03-10 10:30:00"), DEVICE, HUM, 5.0),
    (utc("2026-03-10 11:00:00"), DEVICE, TEMP, 10.0),
    (utc("2026-03-10 11:30:00"), DEVICE, TEMP, None),
    (utc("2026-03-10 11:45:00"), DEVICE, TEMP, -3.0),
    (utc("2026-03-10 12:00:00"), DEVICE, TEMP, 100.0),
]


async def rows(pg: asyncpg.Connection, table: str) -> dict[tuple[str, int], dict[str, Any]]:
    """{(bucket, datapoint): {count, min, max, sum, avg, last, last_ts}}."""
    found = await pg.fetch(f"SELECT * FROM {table} ORDER BY bucket, device_id, datapoint_id")
    return {
        (row["bucket"].isoformat(), row["datapoint_id"]): {
            k: row[k] for k in ("count", "min", "max", "sum", "avg", "last", "last_ts")
        }
        for row in found
    }


def agg(count: int, lo: float, hi: float, total: float, last: float, last_ts: str) -> dict[str, Any]:
    return {
        "count": count,
        "min": lo,
        "max": hi,
        "sum": total,
        "avg": pytest.approx(total / count),
        "last": last,
        "last_ts": utc(last_ts),
    }


async def test_closed_hours_roll_up_to_the_hand_computed_aggregates(
    settings: Settings, pg: asyncpg.Connection, res: JobResources, clock: Clock
) -> None:
    await insert_readings(pg, settings, READINGS)
    result = await tasks.rollup(ctx_of(res), period="2026-03-10T12:00:00+00:00")

    assert result["status"] == "done"
    assert result["rows_in"] == 6 and result["hourly_rows"] == 3 and result["daily_rows"] == 2
    assert await rows(pg, "rollup_hourly") == {
        ("2026-03-10T10:00:00+00:00", TEMP): agg(3, 1, 4, 7, 2, "2026-03-10 10:59:59"),
        ("2026-03-10T10:00:00+00:00", HUM): agg(1, 5, 5, 5, 5, "2026-03-10 10:30:00"),
        ("2026-03-10T11:00:00+00:00", TEMP): agg(2, -3, 10, 7, -3, "2026-03-10 11:45:00"),
    }
    assert await rows(pg, "rollup_daily") == {
        ("2026-03-10T00:00:00+00:00", TEMP): agg(5, -3, 10, 14, -3, "2026-03-10 11:45:00"),
        ("2026-03-10T00:00:00+00:00", HUM): agg(1, 5, 5, 5, 5, "2026-03-10 10:30:00"),
    }
    assert await read_watermark(res.pool) == utc("2026-03-10 12:00")
    run = await ledger.get(res.pool, tasks.ROLLUP, "2026-03-10T12:00:00+00:00")
    assert run is not None and run.status == "done" and run.rows_in == 6 and run.rows_out == 5


async def test_late_data_inside_the_window_is_recomputed_and_older_waits_for_a_backfill(
    settings: Settings, pg: asyncpg.Connection, res: JobResources, clock: Clock
) -> None:
    await insert_readings(pg, settings, READINGS)
    await tasks.rollup(ctx_of(res), period="2026-03-10T12:00:00+00:00")

    # Late arrivals after that run: 11:50 is inside the 2 h window before the watermark
    # (12:00), 09:30 is before it.
    await insert_readings(
        pg,
        settings,
        [(utc("2026-03-10 11:50"), DEVICE, TEMP, 20.0), (utc("2026-03-10 09:30"), DEVICE, TEMP, 50.0)],
    )
    clock.now = utc("2026-03-10 13:05")
    result = await tasks.rollup(ctx_of(res), period="2026-03-10T13:00:00+00:00")
    assert result["hours"] == 3  # 10:00, 11:00 and 12:00

    hourly = await rows(pg, "rollup_hourly")
    assert hourly[("2026-03-10T11:00:00+00:00", TEMP)] == agg(3, -3, 20, 27, 20, "2026-03-10 11:50")
    assert hourly[("2026-03-10T12:00:00+00:00", TEMP)] == agg(1, 100, 100, 100, 100, "2026-03-10 12:00")
    assert ("2026-03-10T09:00:00+00:00", TEMP) not in hourly
    daily = await rows(pg, "rollup_daily")
    assert daily[("2026-03-10T00:00:00+00:00", TEMP)] == agg(7, -3, 100, 134, 100, "2026-03-10 12:00")

    backfill = await tasks.rollup(ctx_of(res), start="2026-03-10T09:00Z", end="2026-03-10T10:00Z")
    assert backfill["status"] == "done" and backfill["hours"] == 1
    hourly = await rows(pg, "rollup_hourly")
    assert hourly[("2026-03-10T09:00:00+00:00", TEMP)] == agg(1, 50, 50, 50, 50, "2026-03-10 09:30")
    daily = await rows(pg, "rollup_daily")
    assert daily[("2026-03-10T00:00:00+00:00", TEMP)] == agg(8, -3, 100, 184, 100, "2026-03-10 12:00")
    # A backfill does not move the watermark.
    assert await read_watermark(res.pool) == utc("2026-03-10 13:00")


async def test_rerunning_a_period_gives_the_same_rows_and_a_done_period_is_skipped(
    settings: Settings, pg: asyncpg.Connection, res: JobResources
) -> None:
    await insert_readings(pg, settings, READINGS)
    period = "2026-03-10T12:00:00+00:00"
    await tasks.rollup(ctx_of(res), period=period)
    first = (await rows(pg, "rollup_hourly"), await rows(pg, "rollup_daily"))

    again = await tasks.rollup(ctx_of(res), period=period)
    assert again["status"] == "skipped"
    forced = await tasks.rollup(ctx_of(res), period=period, force=True)
    assert forced["status"] == "done"
    # The forced run recomputed from the watermark minus the window: the same buckets again.
    assert (await rows(pg, "rollup_hourly"), await rows(pg, "rollup_daily")) == first
    run = await ledger.get(res.pool, tasks.ROLLUP, period)
    assert run is not None and run.attempts == 2


async def test_a_backfill_over_an_empty_range_writes_nothing_and_removes_stale_rows(
    settings: Settings, pg: asyncpg.Connection, res: JobResources
) -> None:
    await insert_readings(pg, settings, READINGS)
    await tasks.rollup(ctx_of(res), start="2026-03-10T10:00Z", end="2026-03-10T12:00Z")
    assert len(await rows(pg, "rollup_hourly")) == 3
    # The raw readings of hour 10 go away (say, deleted by hand); recomputing drops its rows.
    await pg.execute("DELETE FROM decoded_data WHERE timestamp < '2026-03-10 11:00+00'")
    await tasks.rollup(ctx_of(res), start="2026-03-10T10:00Z", end="2026-03-10T11:00Z", force=True)
    assert set(await rows(pg, "rollup_hourly")) == {("2026-03-10T11:00:00+00:00", TEMP)}


async def test_a_backfill_keeps_the_rollups_of_raw_data_retention_already_dropped(
    settings: Settings, pg: asyncpg.Connection, res: JobResources
) -> None:
    # Raw readings on 03-01 and 03-10 (one-day partitions), both rolled up.
    await insert_readings(
        pg,
        settings,
        [(utc("2026-03-01 10:15"), DEVICE, TEMP, 3.0), (utc("2026-03-10 10:15"), DEVICE, TEMP, 5.0)],
    )
    await tasks.rollup(ctx_of(res), start="2026-03-01T00:00Z", end="2026-03-11T00:00Z")
    before_hourly, before_daily = await rows(pg, "rollup_hourly"), await rows(pg, "rollup_daily")
    assert len(before_hourly) == 2 and len(before_daily) == 2

    # Raw retention drops the partitions before 03-02; the rollups are kept far longer.
    removed = await drop_raw_before(res.pool, utc("2026-03-02 00:00"))
    assert removed.partitions  # decoded_data_p20260301, or the hypertable's chunk of 03-01
    # A late reading on 03-10 arrives, then the whole range is backfilled again.
    await insert_readings(pg, settings, [(utc("2026-03-10 10:45"), DEVICE, TEMP, 7.0)])
    result = await tasks.rollup(ctx_of(res), start="2026-03-01T00:00Z", end="2026-03-11T00:00Z", force=True)

    assert result["status"] == "done"
    hourly, daily = await rows(pg, "rollup_hourly"), await rows(pg, "rollup_daily")
    old_hour, old_day = ("2026-03-01T10:00:00+00:00", TEMP), ("2026-03-01T00:00:00+00:00", TEMP)
    assert hourly[old_hour] == before_hourly[old_hour] and daily[old_day] == before_daily[old_day]
    assert hourly[("2026-03-10T10:00:00+00:00", TEMP)] == agg(2, 5, 7, 12, 7, "2026-03-10 10:45")
    assert daily[("2026-03-10T00:00:00+00:00", TEMP)] == agg(2, 5, 7, 12, 7, "2026-03-10 10:45")
    # Everything before the oldest partition still kept is skipped (and said so).
    oldest_kept = await pg.fetchval("SELECT min(timestamp) FROM decoded_data")
    assert oldest_kept >= utc("2026-03-02 00:00")
    assert result["skipped_hours"] >= 24 and result["skipped_days"] >= 1
    assert result["hours"] + result["skipped_hours"] == 240


async def test_a_backfill_keeps_rollups_before_the_recorded_horizon_of_an_unpartitioned_table(
    settings: Settings, pg: asyncpg.Connection, res: JobResources
) -> None:
    # Partitioning off: raw retention deletes row by row and records where it cut.
    await pg.execute("DROP TABLE decoded_data")
    await pg.execute(
        "CREATE TABLE decoded_data (timestamp timestamptz NOT NULL, device_id integer NOT NULL, "
        "datapoint_id integer NOT NULL, value double precision, "
        "PRIMARY KEY (timestamp, device_id, datapoint_id))"
    )
    await pg.executemany(
        "INSERT INTO decoded_data (timestamp, device_id, datapoint_id, value) VALUES ($1, $2, $3, $4)",
        [(ts, DEVICE, TEMP, value) for ts, _, _, value in READINGS],
    )
    await tasks.rollup(ctx_of(res), start="2026-03-10T10:00Z", end="2026-03-10T12:00Z")
    before_hourly, before_daily = await rows(pg, "rollup_hourly"), await rows(pg, "rollup_daily")

    # The cutoff falls inside hour 11: hour 10 is gone, hour 11 and the day are partial.
    await drop_raw_before(res.pool, utc("2026-03-10 11:30"))
    result = await tasks.rollup(ctx_of(res), start="2026-03-10T10:00Z", end="2026-03-10T13:00Z", force=True)

    hourly = await rows(pg, "rollup_hourly")
    assert {key: hourly[key] for key in before_hourly} == before_hourly
    assert hourly[("2026-03-10T12:00:00+00:00", TEMP)] == agg(1, 100, 100, 100, 100, "2026-03-10 12:00")
    assert await rows(pg, "rollup_daily") == before_daily  # not rebuilt from a partial day
    assert (result["hours"], result["skipped_hours"]) == (1, 2)
    assert (result["days"], result["skipped_days"]) == (0, 1)
