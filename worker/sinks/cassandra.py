"""Cassandra time-series writer: `device_data` and `user_data` (schemas/cql/telemetry.cql) for every reading.

Rows are grouped by partition — a device's rows (`device_data`), a user's rows
(`user_data`) — and each group goes as unlogged batches of at most
`cassandra.batch_rows` rows: one partition per batch, so one replica set applies it
in one mutation, and never a logged multi-partition batch (the batch log would cost
more than the writes). The groups go out at once, prepared statements bound to them,
within the store's in-flight limit; token-aware routing sends each to a replica of its
partition. Every write is an upsert of the same key, so a redelivery is harmless, and
retries (the driver's for a timeout, the writer's for an outage) cannot double a row.

Numbers go to `numeric_value`, strings and booleans (`DecodedBatch.texts`) to
`text_value`; `user_data` has no text column, so it takes the numbers of
devices that have a user. `metadata` is never written: a whole-map insert writes a
tombstone first, and nothing fills it yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from schemas.records import DecodedBatch
from worker.stores.cassandra import CassandraStore

if TYPE_CHECKING:
    from cassandra.query import PreparedStatement, Statement

Kind = Literal["numeric", "text", "user"]


def insert_statements(keyspace: str) -> dict[Kind, str]:
    """The CQL of each kind of row; names qualified, so routing needs no session keyspace."""
    return {
        "numeric": f"INSERT INTO {keyspace}.device_data (device_id, timestamp, measurement_name, "
        "numeric_value) VALUES (?, ?, ?, ?)",
        "text": f"INSERT INTO {keyspace}.device_data (device_id, timestamp, measurement_name, "
        "text_value) VALUES (?, ?, ?, ?)",
        "user": f"INSERT INTO {keyspace}.user_data (user_id, timestamp, device_id, measurement_name, "
        "numeric_value) VALUES (?, ?, ?, ?, ?)",
    }


@dataclass(frozen=True, slots=True)
class PartitionWrite:
    """Rows of one partition of one table, sent as one request."""

    kind: Kind
    partition: int  # device_id (numeric, text) or user_id (user)
    rows: list[tuple[Any, ...]]


def plan_writes(batch: DecodedBatch, batch_rows: int) -> list[PartitionWrite]:
    """The batch's rows grouped by (statement, partition), in chunks of at most `batch_rows`."""
    groups: dict[tuple[Kind, int], list[tuple[Any, ...]]] = {}
    users = batch.device_users
    for r in batch.readings:
        groups.setdefault(("numeric", r.device_id), []).append((r.device_id, r.timestamp, r.label, r.value))
        user = users.get(r.device_id)
        if user is not None:
            groups.setdefault(("user", user), []).append((user, r.timestamp, r.device_id, r.label, r.value))
    for t in batch.texts:
        groups.setdefault(("text", t.device_id), []).append((t.device_id, t.timestamp, t.label, t.text))
    return [
        PartitionWrite(kind, partition, chunk)
        for (kind, partition), rows in groups.items()
        for chunk in _chunks(rows, batch_rows)
    ]


def _chunks(rows: list[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def bind(write: PartitionWrite, prepared: PreparedStatement) -> Statement:
    """One bound statement, or an unlogged batch of them (a single partition's)."""
    from cassandra.query import BatchStatement, BatchType

    if len(write.rows) == 1:
        return prepared.bind(write.rows[0])
    batch = BatchStatement(batch_type=BatchType.UNLOGGED)
    for row in write.rows:
        batch.add(prepared, row)  # the first statement's routing key routes the whole batch
    batch.is_idempotent = True
    return batch


class CassandraTimeseriesWriter:
    name = "cassandra"

    def __init__(self, store: CassandraStore) -> None:
        self._store = store
        self._cql = insert_statements(store.settings.keyspace)
        self._batch_rows = store.settings.batch_rows

    async def write(self, batch: DecodedBatch) -> int:
        """Every reading of the batch (Cassandra cannot tell a redelivered row from a new one)."""
        writes = plan_writes(batch, self._batch_rows)
        if writes:
            prepared = {kind: await self._store.prepare(cql) for kind, cql in self._cql.items()}
            # A failure cancels the rest: the writer retries the whole batch, upserts again.
            try:
                async with asyncio.TaskGroup() as group:
                    for write in writes:
                        group.create_task(self._store.execute(bind(write, prepared[write.kind])))
            except ExceptionGroup as failed:
                # The first error as itself, so the writer can tell an outage from a bug.
                raise failed.exceptions[0] from None
        return len(batch.readings)

    async def reset(self) -> None:
        """Nothing to drop: the driver reconnects to nodes that return by itself."""

    async def close(self) -> None:
        """The session belongs to `Stores`."""
