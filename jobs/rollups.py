"""Hourly and daily rollups of `decoded_data`: count, min, max, sum, avg and last per series.

Each bucket is one transaction: delete its rows, then one `INSERT … SELECT … GROUP BY`
computed by PostgreSQL, so re-running a bucket (a retry, the late-data window, a
backfill) gives exactly the rows a first run would. A per-bucket advisory lock keeps two
runs that overlap (a backfill and the scheduled run) from racing on the same bucket.
Daily rows are rebuilt from the hourly ones of that day.

Raw readings are kept for less time than rollups, so a bucket whose raw data retention
has removed (even partly) is never recomputed: that would replace rollups retention
means to keep with nothing. The oldest raw data still kept (the raw horizon) is the
lowest bound of the partitions left, or, without partitions, the cutoff retention
records in `rollup_watermarks` (row `raw_retention`) before removing rows. Buckets and
days before it are skipped and counted. Each bucket checks the horizon in its own
transaction under a shared advisory lock that raw retention takes exclusively, so a
retention run cannot remove a bucket's data between the check and the recompute.

The incremental run starts at the stored watermark minus the late-data window and stops
at the start of the current hour: only closed hours are rolled up. Readings that arrive
later than the window are picked up only by a backfill (`iotflow jobs enqueue rollup`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog

from jobs.periods import DAY, HOUR, ceil_hour, floor_day, floor_hour, parse_time, steps
from worker.stores.partitions import PARENT, is_partitioned
from worker.stores.postgres import Connection

log = structlog.get_logger("jobs.rollups")

WATERMARK = "hourly"
# A watermark only moves forward: two runners (or a retried job) never set it back.
ADVANCE_WATERMARK = (
    "INSERT INTO rollup_watermarks (name, watermark) VALUES ($1, $2) ON CONFLICT (name) "
    "DO UPDATE SET watermark = greatest(rollup_watermarks.watermark, excluded.watermark), "
    "updated_at = now()"
)
RAW_HORIZON = "raw_retention"  # rollup_watermarks row: raw readings before it were removed
_LOCK_HOURLY = 7_001  # advisory lock class ids: (class, bucket epoch hours/days)
_LOCK_DAILY = 7_002
LOCK_RAW = (7_003, 0)  # shared: a bucket being recomputed from raw; exclusive: raw retention
_END_OF_TIME = datetime.max.replace(tzinfo=UTC)

_LOWER_BOUND = re.compile(r"FROM \('([^']+)'\)")

# The last value is found by joining back on the latest timestamp of each series (one
# index lookup per series) rather than array_agg(... ORDER BY), which would sort and
# hold every value of the hour.
_HOURLY = """
WITH agg AS (
    SELECT device_id, datapoint_id, count(*) AS n, min(value) AS lo, max(value) AS hi,
           sum(value) AS total, avg(value) AS mean, max(timestamp) AS last_ts
    FROM decoded_data
    WHERE timestamp >= $1 AND timestamp < $2 AND value IS NOT NULL
    GROUP BY device_id, datapoint_id
), written AS (
    INSERT INTO rollup_hourly (bucket, device_id, datapoint_id, count, min, max, sum, avg, last, last_ts)
    SELECT $1, a.device_id, a.datapoint_id, a.n, a.lo, a.hi, a.total, a.mean, d.value, a.last_ts
    FROM agg a
    JOIN decoded_data d
      ON d.timestamp = a.last_ts AND d.device_id = a.device_id AND d.datapoint_id = a.datapoint_id
     AND d.timestamp >= $1 AND d.timestamp < $2
    RETURNING count
)
SELECT count(*) AS rows_out, coalesce(sum(count), 0)::bigint AS rows_in FROM written
"""

_DAILY = """
WITH written AS (
    INSERT INTO rollup_daily (bucket, device_id, datapoint_id, count, min, max, sum, avg, last, last_ts)
    SELECT $1, device_id, datapoint_id, sum(count), min(min), max(max), sum(sum), sum(sum) / sum(count),
           (array_agg(last ORDER BY last_ts DESC))[1], max(last_ts)
    FROM rollup_hourly
    WHERE bucket >= $1 AND bucket < $2
    GROUP BY device_id, datapoint_id
    RETURNING count
)
SELECT count(*) AS rows_out, coalesce(sum(count), 0)::bigint AS rows_in FROM written
"""


@dataclass
class RollupCounts:
    hours: int = 0
    days: int = 0
    skipped_hours: int = 0  # before the raw horizon: raw data retention removed
    skipped_days: int = 0
    readings: int = 0  # raw readings aggregated into hourly rows
    hourly_rows: int = 0
    daily_rows: int = 0


async def raw_horizon(conn: Connection) -> datetime | None:
    """Raw readings before this moment may have been removed by retention; None: none were.

    Partitioned: the lowest lower bound of the partitions left (retention drops whole ones,
    so each partition left is complete; none left means no raw data at all). Otherwise the
    cutoff raw retention recorded. The later of the two when both exist.
    """
    recorded: datetime | None = await conn.fetchval(
        "SELECT watermark FROM rollup_watermarks WHERE name = $1", RAW_HORIZON
    )
    if not await is_partitioned(conn):
        return recorded
    async with conn.transaction():
        await conn.execute("SET LOCAL TimeZone = 'UTC'")  # bounds print in the session's zone
        bounds = await conn.fetch(
            "SELECT pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass($1) AND NOT i.inhdetachpending",
            PARENT,
        )
    lows = [parse_time(m.group(1)) for row in bounds if (m := _LOWER_BOUND.search(row["bound"]))]
    lowest = min(lows, default=_END_OF_TIME)
    return lowest if recorded is None else max(lowest, recorded)


async def rollup_hour(conn: Connection, bucket: datetime) -> tuple[int, int]:
    """Recompute one hourly bucket; (readings read, rows written). No retention guard (bench)."""
    result = await _rollup_hour(conn, bucket, guarded=False)
    assert result is not None
    return result


async def _rollup_hour(conn: Connection, bucket: datetime, *, guarded: bool) -> tuple[int, int] | None:
    """`guarded`: None, and nothing touched, when the bucket starts before the raw horizon."""
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, $2)", _LOCK_HOURLY, int(bucket.timestamp() // 3600)
        )
        if guarded:
            # Held until commit: raw retention waits for it, so the horizon cannot move
            # under the recompute. Taken before decoded_data is touched (no lock cycle
            # with DETACH CONCURRENTLY, which waits for the parent's lockers).
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1, $2)", *LOCK_RAW)
            horizon = await raw_horizon(conn)
            if horizon is not None and bucket < horizon:
                return None
        await conn.execute("DELETE FROM rollup_hourly WHERE bucket = $1", bucket)
        row = await conn.fetchrow(_HOURLY, bucket, bucket + HOUR)
    assert row is not None
    return int(row["rows_in"]), int(row["rows_out"])


async def rollup_day(conn: Connection, day: datetime) -> int:
    """Recompute one daily bucket from its hourly rows; rows written."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_DAILY, int(day.timestamp() // 86400))
        await conn.execute("DELETE FROM rollup_daily WHERE bucket = $1", day)
        row = await conn.fetchrow(_DAILY, day, day + DAY)
    assert row is not None
    return int(row["rows_out"])


async def rollup_range(pool: asyncpg.Pool, start: datetime, end: datetime) -> RollupCounts:
    """Every hourly bucket overlapping [start, end), then every day those buckets touch.

    Buckets before the raw horizon are skipped, and so is every day starting before it:
    a day partly past raw retention is not rebuilt, and its hours were not recomputed.
    """
    first, counts = floor_hour(start), RollupCounts()
    if end <= first:
        return counts
    async with pool.acquire() as conn:
        horizon = await raw_horizon(conn)
        kept = first if horizon is None else max(first, ceil_hour(min(horizon, _END_OF_TIME - DAY)))
        counts.skipped_hours = (min(kept, ceil_hour(end)) - first) // HOUR
        for bucket in steps(kept, end, HOUR):
            result = await _rollup_hour(conn, bucket, guarded=True)
            if result is None:  # retention moved the horizon since
                counts.skipped_hours += 1
                continue
            counts.hours += 1
            counts.readings += result[0]
            counts.hourly_rows += result[1]
        for day in steps(floor_day(first), end, DAY):
            if horizon is not None and day < horizon:
                counts.skipped_days += 1
                continue
            counts.daily_rows += await rollup_day(conn, day)
            counts.days += 1
    if counts.skipped_hours or counts.skipped_days:
        log.warning(
            "rollups.skipped_before_raw_horizon",
            raw_horizon=None if horizon is None else horizon.isoformat(),
            skipped_hours=counts.skipped_hours,
            skipped_days=counts.skipped_days,
            reason="raw readings removed by retention; their rollups are kept as they are",
        )
    return counts


async def read_watermark(pool: asyncpg.Pool) -> datetime | None:
    moment: datetime | None = await pool.fetchval(
        "SELECT watermark FROM rollup_watermarks WHERE name = $1", WATERMARK
    )
    return moment


async def rollup_incremental(pool: asyncpg.Pool, until: datetime, late_window: timedelta) -> RollupCounts:
    """Roll up the closed hours before `until` not yet done, plus the late-data window before them."""
    until = floor_hour(until)
    watermark = await read_watermark(pool)
    if watermark is None:
        # First run: start at the oldest reading (an index lookup on the primary key).
        oldest: datetime | None = await pool.fetchval("SELECT min(timestamp) FROM decoded_data")
        if oldest is None:
            return RollupCounts()  # nothing yet; keep no watermark so the first data starts it
        start = floor_hour(oldest)
    else:
        start = floor_hour(watermark - late_window)
    counts = await rollup_range(pool, start, until)
    await pool.execute(
        ADVANCE_WATERMARK,
        WATERMARK,
        until,
    )
    return counts
