"""Reading a device's readings over a time range, a page at a time, from the store that
holds them (`timeseries.backend`), saying which one answered.

Newest first on both stores (Cassandra's clustering order). A page ends with a token
for the next one: on PostgreSQL the last row's key (keyset paging: each page is one
index range scan, however deep), on Cassandra the driver's paging state. A token
names its store, so one cannot be handed to the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

import asyncpg

from worker.config import Settings
from worker.retry import is_transient
from worker.stores.cassandra import CassandraStore

Store = Literal["postgres", "cassandra"]


class Source(Protocol):
    """Where readings are read from: `Stores`, or the jobs' `JobResources`."""

    @property
    def settings(self) -> Settings: ...

    @property
    def postgres(self) -> asyncpg.Pool: ...

    @property
    def cassandra(self) -> CassandraStore | None: ...


class BadPageToken(ValueError):
    """A `--page` token that no store of ours made."""


class NoCassandra(ValueError):
    """Cassandra was asked for, but timeseries.backend does not use it."""


@dataclass(frozen=True, slots=True)
class Row:
    timestamp: datetime
    measurement: str
    value: float | None
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    store: Store  # which store answered
    rows: list[Row]
    next: str | None  # the token of the next page; None: this was the last


async def read_device(
    stores: Source,
    device_id: int,
    start: datetime,
    end: datetime,
    *,
    measurement: str | None = None,
    page_size: int = 100,
    page: str | None = None,
    store: Store | None = None,
) -> Page:
    """Readings of `device_id` in [start, end). `store`: that one; None: the configured one,
    and with "both" PostgreSQL, or Cassandra while PostgreSQL is unreachable."""
    if page is not None:
        store = _token_store(page)
    if store is None:
        backend = stores.settings.timeseries.backend
        if backend == "cassandra":
            store = "cassandra"
        elif backend == "postgres":
            store = "postgres"
        else:
            try:
                return await _read_postgres(stores, device_id, start, end, measurement, page_size, None)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                store = "cassandra"
    if store == "cassandra":
        return await _read_cassandra(stores, device_id, start, end, measurement, page_size, page)
    return await _read_postgres(stores, device_id, start, end, measurement, page_size, page)


def _token_store(token: str) -> Store:
    prefix = token.partition(":")[0]
    if prefix == "pg":
        return "postgres"
    if prefix == "cs":
        return "cassandra"
    raise _bad_token(token)


def _bad_token(token: str) -> BadPageToken:
    return BadPageToken(f"{token[:40]!r} is not a page token of this command")


_PG_QUERY = """
SELECT d.timestamp, p.label, d.value, d.datapoint_id
FROM decoded_data d JOIN datapoints p ON p.id = d.datapoint_id
WHERE d.device_id = $1 AND d.timestamp >= $2 AND d.timestamp < $3
  AND ($4::int IS NULL OR d.datapoint_id = $4)
  AND ($5::timestamptz IS NULL OR (d.timestamp, d.datapoint_id) < ($5, $6::int))
ORDER BY d.timestamp DESC, d.datapoint_id DESC
LIMIT $7
"""


async def _read_postgres(
    stores: Source,
    device_id: int,
    start: datetime,
    end: datetime,
    measurement: str | None,
    page_size: int,
    page: str | None,
) -> Page:
    after: tuple[datetime | None, int | None] = (None, None)
    if page is not None:
        try:
            moment, _, datapoint = page.removeprefix("pg:").partition("|")
            after = (datetime.fromisoformat(moment), int(datapoint))
        except ValueError:
            raise _bad_token(page) from None
    async with stores.postgres.acquire() as conn:
        datapoint_id = None
        if measurement is not None:
            datapoint_id = await conn.fetchval(
                "SELECT id FROM datapoints WHERE device_id = $1 AND label = $2", device_id, measurement
            )
            if datapoint_id is None:
                return Page("postgres", [], None)
        # One more than a page: whether there is a next one, without a count.
        found = await conn.fetch(_PG_QUERY, device_id, start, end, datapoint_id, *after, page_size + 1)
    rows = [Row(r["timestamp"], r["label"], r["value"]) for r in found[:page_size]]
    token = None
    if len(found) > page_size:
        last = found[page_size - 1]
        token = f"pg:{last['timestamp'].isoformat()}|{last['datapoint_id']}"
    return Page("postgres", rows, token)


def cassandra_range_query(keyspace: str, by_measurement: bool) -> str:
    """Within one partition; the measurement filter scans only that partition's slice."""
    cql = (
        "SELECT timestamp, measurement_name, numeric_value, text_value "
        f"FROM {keyspace}.device_data WHERE device_id = ? AND timestamp >= ? AND timestamp < ?"
    )
    return cql + " AND measurement_name = ? ALLOW FILTERING" if by_measurement else cql


async def _read_cassandra(
    stores: Source,
    device_id: int,
    start: datetime,
    end: datetime,
    measurement: str | None,
    page_size: int,
    page: str | None,
) -> Page:
    store = stores.cassandra
    if store is None:
        raise NoCassandra(f"timeseries.backend is {stores.settings.timeseries.backend!r}: no Cassandra")
    state = None
    if page is not None:
        try:
            state = bytes.fromhex(page.removeprefix("cs:"))
        except ValueError:
            raise _bad_token(page) from None
    prepared = await store.prepare(cassandra_range_query(store.settings.keyspace, measurement is not None))
    values: list[object] = [device_id, start, end] + ([measurement] if measurement is not None else [])
    bound = prepared.bind(values)
    bound.fetch_size = page_size
    result = await store.execute(bound, paging_state=state)
    rows = [  # the driver returns naive UTC datetimes
        Row(r.timestamp.replace(tzinfo=UTC), r.measurement_name, r.numeric_value, r.text_value)
        for r in result.current_rows
    ]
    token = f"cs:{result.paging_state.hex()}" if result.paging_state else None
    return Page("cassandra", rows, token)
