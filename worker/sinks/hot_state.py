"""Redis hot state as a derived store: a Redis outage never holds up durable ingest.

`RebuildableHotState` wraps the hot-state sink (worker/sinks/redis_state.py). The
writer hands it a batch only after the durable sinks committed it, and acknowledges
without waiting for it (worker/sinks/writer.py). When Redis fails (a transient error,
or no answer within `storage.write_timeout_s`), the wrapper marks hot state stale —
which devices missed values, and the oldest reading they missed — logs once, counts
every skipped batch and stops writing to Redis. A background task pings Redis with
backoff; once it answers, writes go live again and the latest value of every
datapoint of those devices since that oldest reading is read from `decoded_data` and
fed through the same newest-wins script, so a value written live meanwhile is never
replaced by an older one. Every skipped batch is in PostgreSQL before the rebuild
reads it: the writer called this sink only after committing it.

What is lost: the telemetry pub/sub messages of the skipped batches (the rebuild
publishes one per device with the values it restores), and the stale marker itself
when the process stops before Redis returns (those devices' hot state then catches
up with their next reading). docs/storage.md has the whole table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import structlog

from schemas.records import DecodedBatch, Reading
from worker.metrics import Metrics
from worker.retry import STORE_BACKOFF, describe, is_transient
from worker.sinks.base import Abandoned, Sink

log = structlog.get_logger("worker.sinks.hot_state")

REBUILD_CHUNK = 5000  # readings per write while rebuilding

# The newest reading of each datapoint of these devices since the oldest one they missed.
_LATEST = """
SELECT DISTINCT ON (d.device_id, d.datapoint_id) d.timestamp, d.device_id, d.datapoint_id, d.value, p.label
FROM decoded_data d JOIN datapoints p ON p.id = d.datapoint_id
WHERE d.device_id = ANY($1::int[]) AND d.timestamp >= $2
ORDER BY d.device_id, d.datapoint_id, d.timestamp DESC
"""


@dataclass
class _Stale:
    """What hot state has missed since Redis went away."""

    began: float = field(default_factory=time.monotonic)
    devices: set[int] = field(default_factory=set)
    oldest: datetime | None = None
    batches: int = 0

    def absorb(self, batch: DecodedBatch) -> None:
        self.batches += 1
        if not batch.readings:
            return
        self.devices.update(r.device_id for r in batch.readings)
        oldest = min(r.timestamp for r in batch.readings)
        if self.oldest is None or oldest < self.oldest:
            self.oldest = oldest

    def merge(self, other: _Stale | None) -> _Stale:
        if other is not None:
            self.devices |= other.devices
            self.batches += other.batches
            if other.oldest is not None and (self.oldest is None or other.oldest < self.oldest):
                self.oldest = other.oldest
        return self


class RebuildableHotState:
    def __init__(
        self,
        inner: Sink,
        ping: Callable[[], Awaitable[object]],
        pool: asyncpg.Pool,
        metrics: Metrics,
        timeout_s: float,
    ) -> None:
        self.name = inner.name
        self._inner = inner
        self._ping = ping
        self._pool = pool
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
                    hint="durable ingest goes on; hot state is rebuilt from PostgreSQL when Redis returns",
                )
                await self._inner.reset()
        self._stale.absorb(batch)
        self._metrics.inc("hot_state_skipped")
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._rebuild_when_back(), name="hot_state.rebuild")

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
            log.info(
                "hot_state.rebuilt",
                sink=self.name,
                devices=len(missed.devices),
                values=values,
                skipped_batches=missed.batches,
                stale_s=round(time.monotonic() - missed.began, 1),
            )

    async def _rebuild(self, missed: _Stale) -> int:
        if missed.oldest is None:
            return 0
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_LATEST, sorted(missed.devices), missed.oldest)
        readings = [Reading(*row) for row in rows]
        for start in range(0, len(readings), REBUILD_CHUNK):
            chunk = DecodedBatch(readings=readings[start : start + REBUILD_CHUNK])
            await self._abandoned.within(self._inner.write(chunk), self._timeout)
        return len(readings)

    async def reset(self) -> None:
        await self._inner.reset()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._abandoned.close()
        await self._inner.close()
