"""What PostgreSQL keeps of each batch when Cassandra holds the readings
(`timeseries.backend = "cassandra"`): the dead letters and the devices' last-seen times.

The PostgreSQL writer stores both beside `decoded_data`; here it is handed the batch
without its readings (so it stores the dead letters only), and the last-seen update it
would have made from the readings is made here, from the numbers and the texts.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from schemas.records import DecodedBatch, Reading, TextReading
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.stores import Stores

_LAST_SEEN = """
UPDATE devices SET last_seen = greatest(devices.last_seen, s.seen), is_online = true
FROM unnest($1::int[], $2::timestamptz[]) AS s(id, seen)
WHERE devices.id = s.id
"""


class PostgresCoreWriter:
    name = "postgres"

    def __init__(self, stores: Stores) -> None:
        self._pool = stores.postgres
        self._dead_letters = PostgresTimeseriesWriter(stores)

    async def write(self, batch: DecodedBatch) -> None:
        if batch.dead_letters:
            await self._dead_letters.write(replace(batch, readings=[], texts=[]))
        latest: dict[int, datetime] = {}
        readings: list[Reading | TextReading] = [*batch.readings, *batch.texts]
        for reading in readings:
            seen = latest.get(reading.device_id)
            if seen is None or reading.timestamp > seen:
                latest[reading.device_id] = reading.timestamp
        if latest:
            ids = sorted(latest)  # one lock order for every worker: no deadlock between them
            await self._pool.execute(_LAST_SEEN, ids, [latest[i] for i in ids])

    async def reset(self) -> None:
        await self._dead_letters.reset()

    async def close(self) -> None:
        """The pool belongs to `Stores`."""
