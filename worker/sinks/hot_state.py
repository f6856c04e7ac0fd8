"""Redis hot state as a derived store: a Redis outage never holds up durable ingest.

`RebuildableHotState` wraps the hot-state sink (worker/sinks/redis_state.py). The
writer hands it a batch only after the durable sinks committed it, and acknowledges
without waiting for it (worker/sinks/writer.py). When Redis fails (a transient error,
or no answer within `storage.write_timeout_s`), the wrapper marks hot state stale —
which devices missed values, and the oldest reading they missed — logs once, counts
every skipped batch and stops writing to Redis. A background task pings Redis with
backoff; once it answers, writes go live again and the latest value of every
datapoint of those devices since that oldest reading is read from the readings store
(`decoded_data`; with Cassandra alone, `device_data` through the range reads of
worker/stores/timeseries.py) and fed through the same newest-wins script, so a value
written live meanwhile is never replaced by an older one. Every skipped batch is in the
readings store before the rebuild reads it: the writer called this sink only after
committing it.

The oldest reading missed is also marked in PostgreSQL (`hot_state_stale`), so a
process stopped before Redis returns leaves it for the next start, which rebuilds every
device since then (`start`). What is lost: the telemetry pub/sub messages of the skipped
batches (the rebuild publishes one per device with the values it restores).
docs/storage.md has the whole table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import structlog

from schemas.records import DecodedBatch, Reading
from worker.metrics import Metrics
from worker.retry import STORE_BACKOFF, describe, is_transient
from worker.runtime.cancel import cancel_and_wait
from worker.sinks.base import Abandoned, Sink
from worker.stores.timeseries import Source, Store, read_device

log = structlog.get_logger("worker.sinks.hot_state")

REBUILD_CHUNK = 5000  # readings per write while rebuilding

# The newest reading of each datapoint of these devices since the oldest one they missed.
_LATEST = """
SELECT DISTINCT ON (d.device_id, d.datapoint_id) d.timestamp, d.device_id, d.datapoint_id, d.value, p.label
FROM decoded_data d JOIN datapoints p ON p.id = d.datapoint_id
WHERE d.device_id = ANY($1::int[]) AND d.timestamp >= $2
ORDER BY d.device_id, d.datapoint_id, d.timestamp DESC
"""
# The same for every device: a mark left by an earlier run does not say which ones.
_LATEST_ALL = _LATEST.replace("d.device_id = ANY($1::int[]) AND d.timestamp >= $2", "d.timestamp >= $1")
# The newest reading of each datapoint of `devices` (None: every device) since a moment.
Latest = Callable[[set[int] | None, datetime], Awaitable[list[Reading]]]
_FOREVER = datetime(9999, 12, 31, tzinfo=UTC)  # the end of a range read "since a moment"
READ_PAGE = 500  # rows per range read; newest first, so the first page usually has them all


def latest_from_postgres(pool: asyncpg.Pool) -> Latest:
    """One query over `decoded_data`."""

    async def latest(devices: set[int] | None, since: datetime) -> list[Reading]:
        async with pool.acquire() as conn:
            if devices is None:
                rows = await conn.fetch(_LATEST_ALL, since)
            else:
                rows = await conn.fetch(_LATEST, sorted(devices), since)
        return [Reading(*row) for row in rows]

    return latest


def latest_through_reads(source: Source, store: Store) -> Latest:
    """Any store, a device at a time through the range reads (newest first), stopping once
    every datapoint of the device (PostgreSQL's `datapoints`) has its newest reading; text
    readings (and readings without a value) are no hot state. For Cassandra, which cannot
    pick the newest row per measurement on the server."""

    async def latest(devices: set[int] | None, since: datetime) -> list[Reading]:
        async with source.postgres.acquire() as conn:
            rows = await conn.fetch(
                "SELECT device_id, id, label FROM datapoints WHERE $1::int[] IS NULL OR device_id = ANY($1)",
                None if devices is None else sorted(devices),
            )
        points: dict[int, dict[str, int]] = {}
        for row in rows:
            points.setdefault(row["device_id"], {})[row["label"]] = row["id"]
        found: list[Reading] = []
        for device_id, labels in sorted(points.items()):
            missing, page = set(labels), None
            while missing:
                got = await read_device(
                    source, device_id, since, _FOREVER, page_size=READ_PAGE, page=page, store=store
                )
                for r in got.rows:
                    if r.value is not None and r.measurement in missing:
                        missing.discard(r.measurement)
                        point = labels[r.measurement]
                        found.append(Reading(r.timestamp, device_id, point, r.value, r.measurement))
                if got.next is None:
                    break
                page = got.next
        return found

    return latest


_MARK = """
INSERT INTO hot_state_stale (store, since) VALUES ($1, $2)
ON CONFLICT (store) DO UPDATE SET since = least(hot_state_stale.since, excluded.since), marked_at = now()
"""


@dataclass
class _Stale:
    """What hot state has missed since Redis went away."""

    began: float = field(default_factory=time.monotonic)
    devices: set[int] | None = field(default_factory=set)  # None: every device
    oldest: datetime | None = None
    batches: int = 0
    marked: datetime | None = None  # the `since` of its row in hot_state_stale

    def absorb(self, batch: DecodedBatch) -> None:
        self.batches += 1
        if not batch.readings:
            return
        if self.devices is not None:
            self.devices.update(r.device_id for r in batch.readings)
        oldest = min(r.timestamp for r in batch.readings)
        if self.oldest is None or oldest < self.oldest:
            self.oldest = oldest

    def merge(self, other: _Stale | None) -> _Stale:
        if other is not None:
            if self.devices is None or other.devices is None:
                self.devices = None
            else:
                self.devices |= other.devices
            self.batches += other.batches
            if other.oldest is not None and (self.oldest is None or other.oldest < self.oldest):
                self.oldest = other.oldest
        return self

    @property
    def unmarked(self) -> bool:
        return self.oldest is not None and (self.marked is None or self.oldest < self.marked)


class RebuildableHotState:
    def __init__(
        self,
        inner: Sink,
        ping: Callable[[], Awaitable[object]],
        pool: asyncpg.Pool,
        metrics: Metrics,
        timeout_s: float,
        latest: Latest | None = None,
    ) -> None:
        """`pool`: PostgreSQL, which keeps the stale mark; `latest`: where the rebuild reads
        the newest values (default: PostgreSQL's `decoded_data`)."""
        self.name = inner.name
        self._inner = inner
        self._ping = ping
        self._pool = pool
        self._latest = latest or latest_from_postgres(pool)
        self._metrics = metrics
        self._timeout = timeout_s
        self._abandoned = Abandoned()
        self._stale: _Stale | None = None
        self._task: asyncio.Task[None] | None = None
        metrics.gauges["hot_state_stale"] = lambda: float(self.stale)

    @property
    def stale(self) -> bool:
        return self._stale is not None or (self._task is not None and not self._task.done())

    async def write(self, batch: DecodedBatch) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()  # the rebuild crashed: a bug, so crash the writer too
        if self._stale is None:
            try:
                await self._abandoned.within(self._inner.write(batch), self._timeout)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._stale = _Stale()
                self._metrics.inc("sink_errors", sink=self.name)
                log.error(
                    "hot_state.stale",
                    sink=self.name,
                    error=describe(exc),
                    hint="durable ingest goes on; hot state is rebuilt from the readings store afterwards",
                )
                await self._inner.reset()
        self._stale.absorb(batch)
        self._metrics.inc("hot_state_skipped")
        if self._stale.unmarked:
            await self._mark(self._stale)
        self._rebuild_in_background()

    async def start(self) -> None:
        """Rebuild what an earlier run left stale (stopped before Redis returned)."""
        try:
            async with self._pool.acquire() as conn:
                since = await conn.fetchval("SELECT since FROM hot_state_stale WHERE store = $1", self.name)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("hot_state.mark_unread", sink=self.name, error=describe(exc))
            return
        if since is None or self._stale is not None:
            return
        self._stale = _Stale(devices=None, oldest=since, marked=since)
        log.warning("hot_state.stale", sink=self.name, since=since.isoformat(), left_by="an earlier run")
        self._rebuild_in_background()

    def _rebuild_in_background(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._rebuild_when_back(), name="hot_state.rebuild")

    async def _mark(self, stale: _Stale) -> None:
        """Write down the oldest reading missed, so that a restart still rebuilds it. Best
        effort: the writer has just committed to PostgreSQL, and the next batch tries again."""
        assert stale.oldest is not None
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(_MARK, self.name, stale.oldest)
        except Exception as exc:
            if not is_transient(exc):
                raise
            return
        stale.marked = stale.oldest

    async def _rebuild_when_back(self) -> None:
        delays = STORE_BACKOFF.delays()
        while self._stale is not None:
            await asyncio.sleep(next(delays))
            try:
                await self._abandoned.within(self._ping(), self._timeout)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                continue
            missed, self._stale = self._stale, None  # live from here on: newest wins either way
            try:
                values = await self._rebuild(missed)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._stale = missed.merge(self._stale)
                continue
            self._metrics.inc("hot_state_rebuilt", values)
            if self._stale is None and missed.oldest is not None:
                await self._unmark(missed.oldest)
            log.info(
                "hot_state.rebuilt",
                sink=self.name,
                devices="all" if missed.devices is None else len(missed.devices),
                values=values,
                skipped_batches=missed.batches,
                stale_s=round(time.monotonic() - missed.began, 1),
            )

    async def _unmark(self, rebuilt_since: datetime) -> None:
        """Drop the mark, unless another worker marked an older reading meanwhile."""
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(
                    "DELETE FROM hot_state_stale WHERE store = $1 AND since >= $2", self.name, rebuilt_since
                )
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Left in place, the mark makes the next start rebuild once more: harmless.

    async def _rebuild(self, missed: _Stale) -> int:
        if missed.oldest is None:
            return 0
        readings = await self._latest(missed.devices, missed.oldest)
        for start in range(0, len(readings), REBUILD_CHUNK):
            chunk = DecodedBatch(readings=readings[start : start + REBUILD_CHUNK])
            await self._abandoned.within(self._inner.write(chunk), self._timeout)
        return len(readings)

    async def reset(self) -> None:
        await self._inner.reset()

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self._abandoned.close()
        await self._inner.close()
