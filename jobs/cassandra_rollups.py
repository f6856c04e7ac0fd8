"""Rollups into Cassandra's `aggregated_data` (schemas/cql/telemetry.cql), for a Cassandra backend.

The same figures as the PostgreSQL rollups (count, min, max, sum, avg, last), computed
from Cassandra's own `device_data`, so they describe what Cassandra holds in either
mode. Per device and closed hour, one partition slice is read (newest first, paged)
and aggregated here; each (device, measurement) partition then gets its six rows
`{stat}_1h` as one unlogged batch. Days are rebuilt from their hourly rows, read back
per (device, measurement) — the measurements are the device's datapoints in PostgreSQL.
Every row is an upsert of a fixed key, so a rerun (retry, late window, backfill) writes
what a first run would. Rows carry a TTL from the rollup retention settings.

The incremental run keeps its own watermark (`rollup_watermarks` row `cassandra_hourly`).
Without one it starts `jobs.late_window_s` back: Cassandra cannot cheaply say when its
oldest reading is, so older hours need a backfill (`iotflow jobs enqueue rollup --from --to`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from jobs.periods import DAY, HOUR, floor_day, floor_hour, steps
from jobs.rollups import ADVANCE_WATERMARK
from worker.config import Settings
from worker.stores.cassandra import CassandraStore

WATERMARK = "cassandra_hourly"
STATS = ("count", "min", "max", "sum", "avg", "last")


@dataclass
class Stats:
    """One series' figures over a bucket."""

    count: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    sum: float = 0.0
    last: float = 0.0
    last_ts: datetime = field(default_factory=lambda: datetime.min.replace(tzinfo=UTC))

    def add(self, value: float, timestamp: datetime) -> None:
        self.count += 1
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        self.sum += value
        if timestamp >= self.last_ts:
            self.last, self.last_ts = value, timestamp

    def values(self) -> dict[str, float]:
        return {
            "count": float(self.count),
            "min": self.min,
            "max": self.max,
            "sum": self.sum,
            "avg": self.sum / self.count,
            "last": self.last,
        }


def aggregate(
    rows: Iterable[tuple[str, float | None, datetime]], series: dict[str, Stats] | None = None
) -> dict[str, Stats]:
    """(measurement, numeric value, timestamp) rows → figures per measurement (added to
    `series`, page after page); texts skipped."""
    series = {} if series is None else series
    for measurement, value, timestamp in rows:
        if value is not None:
            series.setdefault(measurement, Stats()).add(value, timestamp)
    return series


def combine(hours: dict[datetime, dict[str, tuple[float, int]]]) -> Stats | None:
    """A day's figures from its hourly rows: {hour: {stat: (value, count)}}; None if none."""
    day = Stats()
    for bucket in sorted(hours):  # oldest first: the last hour's `last` is the day's
        hour = hours[bucket]
        if not all(stat in hour for stat in STATS):
            continue  # half-written (a run interrupted): the rerun completes it
        day.count += hour["count"][1]
        day.min = min(day.min, hour["min"][0])
        day.max = max(day.max, hour["max"][0])
        day.sum += hour["sum"][0]
        day.last = hour["last"][0]
    return day if day.count else None


@dataclass
class CassandraRollupCounts:
    hours: int = 0
    days: int = 0
    readings: int = 0
    hourly_rows: int = 0
    daily_rows: int = 0


class CassandraRollups:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, store: CassandraStore) -> None:
        keyspace = settings.cassandra.keyspace
        self._pool = pool
        self._store = store
        jobs = settings.jobs
        self._ttl = {
            "1h": jobs.retention_rollups_hourly_days * 86400,
            "1d": jobs.retention_rollups_daily_days * 86400,
        }
        self._read_raw = (
            "SELECT measurement_name, numeric_value, timestamp FROM "
            f"{keyspace}.device_data WHERE device_id = ? AND timestamp >= ? AND timestamp < ?"
        )
        self._read_hours = (
            "SELECT time_bucket, aggregation_type, value, count FROM "
            f"{keyspace}.aggregated_data WHERE device_id = ? AND measurement_name = ? "
            "AND time_bucket >= ? AND time_bucket < ?"
        )
        self._write = (
            f"INSERT INTO {keyspace}.aggregated_data (device_id, measurement_name, time_bucket, "
            "aggregation_type, value, count) VALUES (?, ?, ?, ?, ?, ?) USING TTL ?"
        )

    async def run_range(self, start: datetime, end: datetime) -> CassandraRollupCounts:
        """Every closed hour overlapping [start, end), then every day they touch."""
        counts = CassandraRollupCounts()
        first = floor_hour(start)
        if end <= first:
            return counts
        devices: list[int] = [row["id"] for row in await self._pool.fetch("SELECT id FROM devices")]
        for bucket in steps(first, end, HOUR):
            results = await asyncio.gather(*(self._hour(device, bucket) for device in devices))
            counts.hours += 1
            counts.readings += sum(readings for readings, _ in results)
            counts.hourly_rows += sum(rows for _, rows in results)
        series = await self._pool.fetch("SELECT device_id, label FROM datapoints ORDER BY device_id, label")
        for day in steps(floor_day(first), end, DAY):
            written = await asyncio.gather(*(self._day(r["device_id"], r["label"], day) for r in series))
            counts.daily_rows += sum(written)
            counts.days += 1
        return counts

    async def _hour(self, device_id: int, bucket: datetime) -> tuple[int, int]:
        """(readings read, rows written) of one device's hour."""
        series: dict[str, Stats] = {}
        async for rows in self._pages(self._read_raw, [device_id, bucket, bucket + HOUR]):
            aggregate(
                ((r.measurement_name, r.numeric_value, r.timestamp.replace(tzinfo=UTC)) for r in rows), series
            )
        written = 0
        for measurement, stats in series.items():
            written += await self._put(device_id, measurement, bucket, "1h", stats)
        return sum(s.count for s in series.values()), written

    async def _day(self, device_id: int, measurement: str, day: datetime) -> int:
        hours: dict[datetime, dict[str, tuple[float, int]]] = {}
        async for rows in self._pages(self._read_hours, [device_id, measurement, day, day + DAY]):
            for r in rows:
                stat, _, period = r.aggregation_type.partition("_")
                if period == "1h":
                    hours.setdefault(r.time_bucket, {})[stat] = (r.value, r.count)
        stats = combine(hours)
        if stats is None:
            return 0
        return await self._put(device_id, measurement, day, "1d", stats)

    async def _put(
        self, device_id: int, measurement: str, bucket: datetime, period: str, stats: Stats
    ) -> int:
        from cassandra.query import BatchStatement, BatchType

        prepared = await self._store.prepare(self._write)
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)  # one partition: (device, measurement)
        for stat, value in stats.values().items():
            batch.add(
                prepared,
                (device_id, measurement, bucket, f"{stat}_{period}", value, stats.count, self._ttl[period]),
            )
        batch.is_idempotent = True
        await self._store.execute(batch)
        return len(STATS)

    async def _pages(self, cql: str, values: list[Any]) -> AsyncIterator[list[Any]]:
        """The rows of one partition slice, a page at a time (never all of an hour at once)."""
        prepared = await self._store.prepare(cql)
        state: bytes | None = None
        while True:
            bound = prepared.bind(values)
            bound.fetch_size = 5000
            result = await self._store.execute(bound, paging_state=state)
            yield result.current_rows
            state = result.paging_state
            if not state:
                return

    async def run_incremental(self, until: datetime, late_window: timedelta) -> CassandraRollupCounts:
        until = floor_hour(until)
        watermark: datetime | None = await self._pool.fetchval(
            "SELECT watermark FROM rollup_watermarks WHERE name = $1", WATERMARK
        )
        start = floor_hour((watermark or until) - late_window)
        counts = await self.run_range(start, until)
        await self._pool.execute(
            ADVANCE_WATERMARK,
            WATERMARK,
            until,
        )
        return counts
