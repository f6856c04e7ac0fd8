"""What PostgreSQL keeps of each batch when Cassandra holds the readings
(`timeseries.backend = "cassandra"`): the dead letters and the devices' last-seen times.

The PostgreSQL writer stores both beside `decoded_data`; here it is handed the batch
without its readings (so it stores the dead letters only), and the last-seen update it
would have made from the readings is made here, from the numbers and the texts, in the
same transaction.
"""

from __future__ import annotations

from dataclasses import replace

from schemas.records import DecodedBatch, Reading, TextReading
from worker.sinks.postgres import LAST_SEEN, PostgresTimeseriesWriter, Within, time_span, to_micros
from worker.stores import Stores
from worker.stores.postgres import Connection


class PostgresCoreWriter:
    name = "postgres"

    def __init__(self, stores: Stores) -> None:
        self._dead_letters = PostgresTimeseriesWriter(stores)

    async def write(self, batch: DecodedBatch, within: Within | None = None) -> None:
        """`within` runs last in the transaction (as PostgresTimeseriesWriter.write's)."""
        readings: list[Reading | TextReading] = [*batch.readings, *batch.texts]
        if not (batch.dead_letters or readings or within):
            return

        async def last_seen(conn: Connection) -> None:
            if readings:
                _, latest = time_span(readings)
                ids = sorted(latest)  # one lock order for every worker: no deadlock between them
                await conn.execute(LAST_SEEN, ids, [to_micros(latest[i]) for i in ids])
            if within is not None:
                await within(conn)

        await self._dead_letters.write(replace(batch, readings=[], texts=[]), last_seen)

    async def reset(self) -> None:
        await self._dead_letters.reset()

    async def close(self) -> None:
        """The pool belongs to `Stores`."""
