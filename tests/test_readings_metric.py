"""`readings_written` counts the rows PostgreSQL inserted; redelivered ones count as duplicates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.records import DecodedBatch, Reading
from worker.metrics import Metrics
from worker.runtime.mailbox import Mailbox
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.sinks.writer import BatchWriter
from worker.stores import Stores


async def test_a_redelivered_batch_counts_as_duplicates_not_as_written(stores: Stores) -> None:
    metrics = Metrics()
    writer = BatchWriter(
        Mailbox(10),
        [PostgresTimeseriesWriter(stores)],
        acknowledge=len,
        metrics=metrics,
        batch_size=1_000,
        flush_interval_s=60.0,
    )
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    readings = [Reading(start + timedelta(seconds=n), 1, 1, float(n), "temperature") for n in range(4)]

    await writer.handle([DecodedBatch(readings=readings[:3], messages=3)])
    await writer.drained()
    # The broker redelivers the first two messages, alongside a new one.
    await writer.handle([DecodedBatch(readings=readings[:2] + readings[3:], messages=3)])
    await writer.drained()

    assert metrics.counters["readings_written"] == 4
    assert metrics.counters["readings_duplicate"] == 2
    assert await stores.postgres.fetchval("SELECT count(*) FROM decoded_data") == 4
