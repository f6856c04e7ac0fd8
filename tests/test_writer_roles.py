"""The ack rule: durable sinks before the ack; derived sinks (hot state) after, never waited for."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from schemas.records import AckToken, DecodedBatch, Reading
from worker.metrics import Metrics
from worker.runtime.mailbox import Mailbox
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.sinks.writer import BatchWriter
from worker.stores import Stores

from .helpers import background, wait_for


class Watcher:
    """A derived sink that notes, at each write, how many rows PostgreSQL already holds,
    and waits for `release` before it returns."""

    name = "watcher"

    def __init__(self, stores: Stores) -> None:
        self._pool = stores.postgres
        self.seen_rows: list[int] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def write(self, batch: DecodedBatch) -> None:
        self.seen_rows.append(await self._pool.fetchval("SELECT count(*) FROM decoded_data"))
        self.entered.set()
        await self.release.wait()
        self.release.clear()

    async def reset(self) -> None:
        """Nothing to drop."""

    async def close(self) -> None:
        """Nothing to close."""


def _batch(first: int, count: int, mid: int) -> DecodedBatch:
    start = datetime(2026, 2, 1, tzinfo=UTC)
    return DecodedBatch(
        readings=[
            Reading(start + timedelta(seconds=first + n), 1, 1, float(n), "temperature") for n in range(count)
        ],
        acks=[AckToken(generation=1, mid=mid)],
        messages=1,
    )


async def test_derived_sinks_see_a_batch_after_it_is_stored_and_the_ack_does_not_wait_for_them(
    stores: Stores,
) -> None:
    acked: list[AckToken] = []

    def acknowledge(tokens: list[AckToken]) -> int:
        acked.extend(tokens)
        return len(tokens)

    watcher = Watcher(stores)
    writer = BatchWriter(
        Mailbox(10),
        [PostgresTimeseriesWriter(stores)],
        acknowledge,
        Metrics(),
        batch_size=1,  # every batch commits as it comes
        flush_interval_s=60.0,
        derived=[watcher],
    )
    try:
        await writer.handle([_batch(0, 5, mid=1)])  # stored and acknowledged: it returns
        await watcher.entered.wait()
        assert watcher.seen_rows == [5]  # the durable store had the batch before hot state saw it
        assert [a.mid for a in acked] == [1]  # acknowledged while hot state is still writing
        watcher.entered.clear()

        async with background(writer.handle([_batch(5, 3, mid=2)])) as second:
            await wait_for(lambda: _true(len(acked) == 2))  # the next batch: stored and acknowledged ...
            assert watcher.seen_rows == [5]  # ... its hot state waits for the previous batch's
            watcher.release.set()
            await watcher.entered.wait()
            assert watcher.seen_rows == [5, 8]
            await asyncio.wait_for(second, 30)
        watcher.release.set()
        await writer.drained()  # waits for the last hot-state write
    finally:
        watcher.release.set()
        await writer.close()


async def _true(value: bool) -> bool:
    return value
