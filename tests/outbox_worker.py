"""Both mode as a process, for the kill -9 test: numbered batches into MirroredReadings.

`python -m tests.outbox_worker DEVICE_ID DATAPOINT_ID` with the primary's settings in
`IOTFLOW_*` and the second store's PostgreSQL in OUTBOX_OTHER_URL / OUTBOX_OTHER_SCHEMA.
It prints `ready`, waits for a line on stdin, then writes batch 1, 2, … and prints
`acked N` after each write returned (the point where the writer would acknowledge it).
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from schemas.records import DecodedBatch, Reading
from worker.config import load_settings
from worker.metrics import Metrics
from worker.sinks.mirror import mirrored_readings
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.stores import Stores, open_stores

READINGS_PER_BATCH = 10
_BASE = datetime(2026, 1, 1, tzinfo=UTC)


class OtherStore(PostgresTimeseriesWriter):
    """PostgreSQL in a schema of its own, standing in for the second readings store
    (Cassandra's place in both mode); it notes the batches it received, in order."""

    name = "other"

    def __init__(self, stores: Stores) -> None:
        super().__init__(stores)
        self.received: list[int] = []

    async def write(self, batch: DecodedBatch) -> int:
        stored = await super().write(batch)
        if batch.readings:
            self.received.append(batch_number(batch))
        return stored


def numbered_batch(number: int, device_id: int, datapoint_id: int) -> DecodedBatch:
    """Batch `number`: its own timestamps, values number*1000 + i."""
    first = number * READINGS_PER_BATCH
    return DecodedBatch(
        readings=[
            Reading(
                _BASE + timedelta(seconds=first + i),
                device_id,
                datapoint_id,
                number * 1000.0 + i,
                "temperature",
            )
            for i in range(READINGS_PER_BATCH)
        ],
        messages=READINGS_PER_BATCH,
        device_users={device_id: None},
    )


def batch_number(batch: DecodedBatch) -> int:
    return int(batch.readings[0].value // 1000)


async def main(device_id: int, datapoint_id: int) -> None:
    settings = load_settings()
    other = replace(settings, postgres=replace(settings.postgres, url=os.environ["OUTBOX_OTHER_URL"]))
    other.postgres.schema = os.environ["OUTBOX_OTHER_SCHEMA"]
    async with open_stores(settings) as stores, open_stores(other) as other_stores:
        sink = mirrored_readings(
            PostgresTimeseriesWriter(stores), OtherStore(other_stores), stores, Metrics()
        )
        await sink.start()
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        number = 1
        while True:
            await sink.write(numbered_batch(number, device_id, datapoint_id))
            print(f"acked {number}", flush=True)
            number += 1


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
