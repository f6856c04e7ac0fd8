"""The Cassandra backend against a real Cassandra: migrate, write, read back, TTL, redelivery,
paging, rollups into aggregated_data, device reports and the hot-state rebuild read from Cassandra.

The suite's own Cassandra 5.0 node (tests/conftest.py), or the one
IOTFLOW_TEST_CASSANDRA_HOSTS names. Each test works in a keyspace of its own, dropped
afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from jobs.cassandra_rollups import CassandraRollups
from jobs.context import JobResources
from jobs.reports import build_reports, metric_name
from schemas.records import DecodedBatch, Reading, TextReading
from worker.config import Settings
from worker.sinks.cassandra import CassandraTimeseriesWriter
from worker.sinks.hot_state import latest_through_reads
from worker.stores import Stores, open_stores
from worker.stores.cassandra import CassandraStore
from worker.stores.cassandra_schema import TABLES, migrate_cassandra, schema_problem
from worker.stores.timeseries import read_device

from .helpers import with_cassandra

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


@pytest.fixture
async def cstores(settings: Settings, cassandra_hosts: str) -> AsyncIterator[Stores]:
    """The stores with Cassandra as the time-series backend, in a fresh migrated keyspace."""
    configured = with_cassandra(settings, cassandra_hosts, "cassandra")
    keyspace = configured.cassandra.keyspace
    async with open_stores(configured) as stores:
        assert stores.cassandra is not None
        await migrate_cassandra(stores.cassandra)
        try:
            yield stores
        finally:
            await stores.cassandra.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


def _store(stores: Stores) -> CassandraStore:
    assert stores.cassandra is not None
    return stores.cassandra


async def _device(pg: asyncpg.Connection) -> tuple[int, int, dict[str, int]]:
    row = await pg.fetchrow("SELECT id, user_id FROM devices WHERE device_key = 'sim-json-01'")
    assert row is not None and row["user_id"] is not None
    labels = await pg.fetch("SELECT label, id FROM datapoints WHERE device_id = $1", row["id"])
    return row["id"], row["user_id"], {r["label"]: r["id"] for r in labels}


def _batch(device_id: int, user_id: int, datapoints: dict[str, int], seconds: int) -> DecodedBatch:
    readings = [
        Reading(T0 + timedelta(seconds=s), device_id, datapoint_id, float(s), label)
        for s in range(seconds)
        for label, datapoint_id in sorted(datapoints.items())
    ]
    # A text reading (its datapoint id does not matter to Cassandra, which keys by name).
    texts = [TextReading(T0, device_id, 0, "open", "door")]
    return DecodedBatch(readings=readings, texts=texts, device_users={device_id: user_id})


async def _count(store: CassandraStore, cql: str, *values: object) -> int:
    result = await store.execute(cql, list(values))
    return int(result.current_rows[0][0])


async def test_migrate_creates_the_tables_with_ttl_and_time_window_compaction(cstores: Stores) -> None:
    store = _store(cstores)
    await migrate_cassandra(store)  # a second run changes nothing and fails on nothing
    assert await schema_problem(store) == ""
    rows = (
        await store.execute(
            "SELECT table_name, default_time_to_live, compaction FROM system_schema.tables WHERE keyspace_name = %s",
            [store.settings.keyspace],
        )
    ).current_rows
    tables = {r.table_name: r for r in rows}
    assert set(TABLES) <= set(tables)
    for name in TABLES:
        assert tables[name].compaction["class"].endswith("TimeWindowCompactionStrategy")
    assert tables["device_data"].default_time_to_live == 90 * 86400
    assert tables["user_data"].default_time_to_live == 90 * 86400


async def test_readings_are_written_read_back_with_ttl_and_redelivery_adds_nothing(
    cstores: Stores, pg: asyncpg.Connection
) -> None:
    store = _store(cstores)
    device_id, user_id, datapoints = await _device(pg)
    batch = _batch(device_id, user_id, datapoints, 30)
    sink = CassandraTimeseriesWriter(store)
    assert await sink.write(batch) == len(batch.readings)
    await sink.write(batch)  # redelivery: the same keys, upserted
    ks = store.settings.keyspace
    numeric = len(batch.readings)
    assert (
        await _count(store, f"SELECT count(*) FROM {ks}.device_data WHERE device_id = %s", device_id)
        == numeric + 1
    )
    assert await _count(store, f"SELECT count(*) FROM {ks}.user_data WHERE user_id = %s", user_id) == numeric
    ttl = (
        await store.execute(
            f"SELECT TTL(numeric_value) FROM {ks}.device_data WHERE device_id = %s LIMIT 1", [device_id]
        )
    ).current_rows[0][0]
    assert 0 < ttl <= 90 * 86400
    text = (
        await store.execute(
            f"SELECT text_value, numeric_value FROM {ks}.device_data WHERE device_id = %s AND timestamp = %s "
            "AND measurement_name = 'door'",
            [device_id, T0],
        )
    ).current_rows
    assert [(r.text_value, r.numeric_value) for r in text] == [("open", None)]


async def test_a_range_reads_back_in_pages_newest_first(cstores: Stores, pg: asyncpg.Connection) -> None:
    store = _store(cstores)
    device_id, user_id, datapoints = await _device(pg)
    await CassandraTimeseriesWriter(store).write(_batch(device_id, user_id, datapoints, 20))
    start, end = T0 + timedelta(seconds=5), T0 + timedelta(seconds=15)
    rows, token, pages = [], None, 0
    while True:
        page = await read_device(cstores, device_id, start, end, page_size=7, page=token)
        assert page.store == "cassandra"
        rows += page.rows
        pages += 1
        if page.next is None:
            break
        token = page.next
    assert len(rows) == 10 * len(datapoints) and pages >= 2
    assert [r.timestamp for r in rows] == sorted((r.timestamp for r in rows), reverse=True)
    assert all(start <= r.timestamp < end for r in rows)
    label = sorted(datapoints)[0]
    only = await read_device(cstores, device_id, start, end, measurement=label, page_size=100)
    assert [r.value for r in only.rows] == [float(s) for s in range(14, 4, -1)]


async def test_a_rollup_writes_aggregated_data(cstores: Stores, pg: asyncpg.Connection) -> None:
    store = _store(cstores)
    device_id, user_id, datapoints = await _device(pg)
    await CassandraTimeseriesWriter(store).write(_batch(device_id, user_id, datapoints, 60))
    rollups = CassandraRollups(cstores.settings, cstores.postgres, store)
    counts = await rollups.run_range(T0, T0 + timedelta(hours=1))
    assert counts.readings == 60 * len(datapoints)
    again = await rollups.run_range(T0, T0 + timedelta(hours=1))  # a rerun writes the same rows
    assert again.hourly_rows == counts.hourly_rows
    label = sorted(datapoints)[0]
    rows = (
        await store.execute(
            f"SELECT time_bucket, aggregation_type, value, count, TTL(value) AS ttl FROM {store.settings.keyspace}"
            ".aggregated_data WHERE device_id = %s AND measurement_name = %s",
            [device_id, label],
        )
    ).current_rows
    hourly = {r.aggregation_type: (r.value, r.count) for r in rows if r.aggregation_type.endswith("_1h")}
    assert hourly == {
        "count_1h": (60.0, 60),
        "min_1h": (0.0, 60),
        "max_1h": (59.0, 60),
        "sum_1h": (1770.0, 60),
        "avg_1h": (29.5, 60),
        "last_1h": (59.0, 60),
    }
    daily = {r.aggregation_type: r.value for r in rows if r.aggregation_type.endswith("_1d")}
    assert daily["sum_1d"] == 1770.0 and daily["last_1d"] == 59.0
    assert all(r.ttl and r.ttl > 0 for r in rows)


async def test_a_device_report_reads_the_readings_from_cassandra(
    cstores: Stores, pg: asyncpg.Connection
) -> None:
    store = _store(cstores)
    device_id, user_id, datapoints = await _device(pg)
    await pg.execute("UPDATE devices SET created_at = $1, max_silence_s = 10 WHERE id = $2", T0, device_id)
    await CassandraTimeseriesWriter(store).write(_batch(device_id, user_id, datapoints, 60))
    res = JobResources.of(cstores, clock=lambda: T0 + timedelta(days=1))
    built = await build_reports(res, T0, T0 + timedelta(minutes=2), [device_id])
    assert len(built) == 1 and built[0]["store"] == "cassandra"
    metrics = built[0]["metrics"]
    # Readings each second for 60 s, each up for 10 s: 69 s of 120. The text reading is no data point.
    assert metrics["uptime_percentage"] == round(100 * 69 / 120, 2)
    assert metrics["total_data_points"] == 60 * len(datapoints)
    for label in datapoints:
        assert metrics[metric_name(label)] == pytest.approx(29.5)


async def test_hot_state_is_rebuilt_from_cassandra_newest_values(
    cstores: Stores, pg: asyncpg.Connection
) -> None:
    store = _store(cstores)
    device_id, user_id, datapoints = await _device(pg)
    await CassandraTimeseriesWriter(store).write(_batch(device_id, user_id, datapoints, 30))
    found = await latest_through_reads(cstores, "cassandra")({device_id}, T0 + timedelta(seconds=10))
    # The newest value of each datapoint; the text reading ("door") is no hot state.
    assert sorted((r.label, r.datapoint_id, r.value, r.timestamp) for r in found) == sorted(
        (label, point, 29.0, T0 + timedelta(seconds=29)) for label, point in datapoints.items()
    )
