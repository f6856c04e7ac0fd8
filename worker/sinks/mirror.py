"""Both mode: every batch to two readings stores; while one is down, into its outbox instead.

`MirroredReadings` is one sink to the writer. It writes each batch to both stores at
once. A store that fails with a transient error (worker/retry.py) or takes longer than
`storage.write_timeout_s` is down: the batch goes into that store's durable outbox
(worker/sinks/outbox.py) and the write counts as done, so the writer acknowledges the
batch once it is in one store and in the outbox of the other. If both stores fail,
the write fails and the writer retries it with nothing acknowledged (backpressure).

While a store's outbox holds anything, new batches for it go straight to the outbox
(nothing overtakes the backlog), and a background task of this sink replays the
outbox, oldest first, until it is empty; then writes go to the store again. The
outbox of the primary (PostgreSQL) is the local journal; the other store's is the
PostgreSQL `outbox` table. One log line when a store's outbox starts holding and one
when it is drained, never one per batch; `outbox_backlog_batches` and the `outbox_*` counters
say the rest (docs/storage.md).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from schemas.records import DecodedBatch
from worker.metrics import Metrics
from worker.retry import STORE_BACKOFF, describe, is_transient
from worker.runtime.cancel import cancel_and_wait
from worker.sinks.base import Abandoned, Sink
from worker.sinks.outbox import JournalOutbox, Outbox, PostgresOutbox, decode_batch, encode_batch
from worker.stores import Stores

log = structlog.get_logger("worker.sinks.mirror")


@dataclass
class _Lane:
    """One of the two stores, its outbox, and this process's view of the backlog."""

    sink: Sink
    outbox: Outbox
    held: int = 0  # batches in the outbox
    replayed: int = 0  # batches replayed since it started holding
    since: float = 0.0  # monotonic time the outbox started holding
    task: asyncio.Task[None] | None = None  # the replayer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # appends vs. "the outbox is empty"

    def start_holding(self, **fields: object) -> None:
        """The outbox goes from empty to holding: one line for the whole backlog."""
        if not self.held:
            self.since, self.replayed = time.monotonic(), 0
            log.warning("outbox.holding", store=self.sink.name, outbox=self.outbox.kind, **fields)


@dataclass(frozen=True, slots=True)
class _Missed:
    """A store did not take the batch: it failed (`cause`), or it is behind its backlog and
    the batch went into its outbox (`held`)."""

    cause: BaseException | None
    held: bool = False


class MirroredReadings:
    def __init__(
        self,
        primary: Sink,
        secondary: Sink,
        outboxes: tuple[Outbox, Outbox],
        metrics: Metrics,
        timeout_s: float,
    ) -> None:
        self.name = f"{primary.name}+{secondary.name}"
        self._lanes = (_Lane(primary, outboxes[0]), _Lane(secondary, outboxes[1]))
        self._metrics = metrics
        self._timeout = timeout_s
        self._abandoned = Abandoned()
        metrics.gauges["outbox_backlog_batches"] = lambda: float(sum(lane.held for lane in self._lanes))
        metrics.gauges["readings_stores_behind"] = lambda: float(sum(bool(lane.held) for lane in self._lanes))

    async def start(self) -> None:
        """Replay what an earlier run left in the outboxes (a kill during an outage)."""
        for lane in self._lanes:
            self._replay_in_background(lane, look_first=True)

    async def write(self, batch: DecodedBatch) -> int | None:
        for lane in self._lanes:
            if lane.task is not None and lane.task.done() and not lane.task.cancelled():
                lane.task.result()  # a replayer that crashed: a bug, so crash the writer too
        # Behind a backlog a batch goes to the outbox, unless both have one (left by an earlier
        # run): then both stores are tried, or nothing could ever be acknowledged.
        skip_held = not all(lane.held for lane in self._lanes)
        async with asyncio.TaskGroup() as group:
            tries = [group.create_task(self._try(lane, batch, skip_held)) for lane in self._lanes]
        results = [task.result() for task in tries]
        stored = [result for result in results if not isinstance(result, _Missed)]
        if not stored:
            # Neither store has it: nothing may be acknowledged. The writer retries.
            first = next(r.cause for r in results if isinstance(r, _Missed) and r.cause is not None)
            raise first
        for lane, result in zip(self._lanes, results, strict=True):
            if isinstance(result, _Missed) and not result.held:
                await self._hold(lane, encode_batch(batch), len(batch.readings), result.cause)
        return stored[0]  # the primary's count when it has the batch

    async def _try(self, lane: _Lane, batch: DecodedBatch, skip_held: bool) -> int | _Missed | None:
        if lane.held and skip_held:
            # Behind its backlog: into the outbox at once, beside the other store's write.
            # Should that write fail, nothing is acknowledged and the redelivered batch is
            # held a second time, which its replay absorbs (idempotent writes).
            try:
                await self._hold(lane, encode_batch(batch), len(batch.readings), None)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                return _Missed(exc)  # held again below if the other store takes the batch
            return _Missed(None, held=True)
        try:
            return await self._abandoned.within(lane.sink.write(batch), self._timeout)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._metrics.inc("sink_errors", sink=lane.sink.name)
            await lane.sink.reset()
            return _Missed(exc)

    async def _hold(self, lane: _Lane, body: bytes, readings: int, cause: BaseException | None) -> None:
        async with lane.lock:
            await lane.outbox.append(body, readings)  # raises: not held, so not acknowledged
            lane.start_holding(
                error=describe(cause) if cause else None,
                hint="the store is down; its batches wait in the outbox and are replayed when it returns",
            )
            lane.held += 1
        self._metrics.inc("outbox_appended", sink=lane.sink.name)
        self._replay_in_background(lane)

    def _replay_in_background(self, lane: _Lane, look_first: bool = False) -> None:
        if lane.task is None or lane.task.done():
            lane.task = asyncio.create_task(self._replay(lane, look_first), name=f"outbox.{lane.sink.name}")

    async def _replay(self, lane: _Lane, look_first: bool) -> None:
        """Deliver the outbox, oldest first, until it is empty; wait out the store meanwhile."""
        delays = STORE_BACKOFF.delays()
        if look_first:
            left = await self._remaining(lane)
            if not left:
                return
            async with lane.lock:
                lane.start_holding(backlog=left, left_by="an earlier run")
                lane.held = max(lane.held, left)
        while True:
            try:
                delivered = await lane.outbox.replay_head(lambda body: self._deliver(lane, body))
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._metrics.inc("sink_errors", sink=lane.sink.name)
                await lane.sink.reset()
                await asyncio.sleep(next(delays))
                continue
            if delivered:
                lane.held = max(0, lane.held - 1)
                lane.replayed += 1
                self._metrics.inc("outbox_replayed", sink=lane.sink.name)
                delays = STORE_BACKOFF.delays()
                continue
            async with lane.lock:
                left = await self._remaining(lane)
                if not left:
                    log.info(
                        "outbox.drained",
                        store=lane.sink.name,
                        outbox=lane.outbox.kind,
                        replayed=lane.replayed,
                        held_s=round(time.monotonic() - lane.since, 1),
                    )
                    lane.held = 0
                    return
            await asyncio.sleep(next(delays))  # another worker is replaying it

    async def _deliver(self, lane: _Lane, body: bytes) -> None:
        await self._abandoned.within(lane.sink.write(decode_batch(body)), self._timeout)

    async def _remaining(self, lane: _Lane) -> int:
        delays = STORE_BACKOFF.delays()
        while True:
            try:
                return await lane.outbox.remaining()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                await asyncio.sleep(next(delays))

    async def reset(self) -> None:
        for lane in self._lanes:
            await lane.sink.reset()

    async def close(self) -> None:
        for lane in self._lanes:
            if lane.task is not None:
                await cancel_and_wait(lane.task)
        await self._abandoned.close()  # after the replayers: what they gave up on is in it
        for lane in self._lanes:
            await lane.outbox.close()
            await lane.sink.close()


def mirrored_readings(primary: Sink, secondary: Sink, stores: Stores, metrics: Metrics) -> MirroredReadings:
    """Both mode over `primary` (the PostgreSQL readings sink, whose database holds the
    other store's outbox) and `secondary`; the primary's outbox is the journal."""
    storage = stores.settings.storage
    journal = JournalOutbox(Path(storage.data_dir) / f"outbox-{primary.name}.journal")
    table = PostgresOutbox(stores.postgres, secondary.name)
    return MirroredReadings(primary, secondary, (journal, table), metrics, storage.write_timeout_s)
