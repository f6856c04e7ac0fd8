"""Redis hot state is derived: what a stopped worker left stale is rebuilt by the next start."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from schemas.records import DecodedBatch, Reading
from worker.config import Settings
from worker.metrics import Metrics
from worker.sinks import hot_state
from worker.sinks.hot_state import RebuildableHotState, latest_from_postgres, latest_through_reads
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.sinks.redis_state import RedisHotStateWriter
from worker.stores import Stores
from worker.stores.redis import redis_client

from .helpers import wait_for
from .test_outages import proxied


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("reads", ["sql", "range reads"])
async def test_hot_state_left_stale_by_a_stopped_worker_is_rebuilt_at_the_next_start(
    settings: Settings, stores: Stores, pg: asyncpg.Connection, reads: str
) -> None:
    """ "range reads": the rebuild as with Cassandra alone (`latest_through_reads`), run here
    over PostgreSQL's rows."""
    device = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'sim-json-01'")
    point = await pg.fetchval(
        "SELECT id FROM datapoints WHERE device_id = $1 AND label = 'temperature'", device
    )
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    batch = DecodedBatch(
        readings=[
            Reading(at + timedelta(seconds=n), device, point, 20.0 + n, "temperature") for n in range(3)
        ]
    )
    await PostgresTimeseriesWriter(stores).write(batch)  # the durable store has it

    proxy, url = await proxied(settings.redis.url)
    away = redis_client(replace(settings.redis, url=url))
    try:
        proxy.cut()
        first = RebuildableHotState(
            RedisHotStateWriter(away, stores.keys), away.ping, stores.postgres, Metrics(), 1.0
        )
        await first.write(batch)  # Redis refuses: skipped, marked in PostgreSQL
        assert await pg.fetchval("SELECT since FROM hot_state_stale WHERE store = 'redis'") == at
        await first.close()  # the worker stops before Redis returns
    finally:
        await away.aclose()
        await proxy.stop()

    metrics = Metrics()
    latest = latest_through_reads(stores, "postgres") if reads == "range reads" else None
    second = RebuildableHotState(
        RedisHotStateWriter(stores.redis, stores.keys),
        stores.redis.ping,
        stores.postgres,
        metrics,
        1.0,
        latest,
    )
    try:
        await second.start()
        assert metrics.gauges["hot_state_stale"]() == 1.0
        await wait_for(lambda: _true(metrics.gauges["hot_state_stale"]() == 0.0), timeout=30)
        latest = await stores.redis.hget(stores.keys.device_latest(device), "temperature")
        assert latest == b"22.0"
        assert await pg.fetchval("SELECT count(*) FROM hot_state_stale") == 0
        assert metrics.count("hot_state_rebuilt") >= 1
    finally:
        await second.close()


async def test_the_latest_values_through_range_reads_equal_the_sql(
    stores: Stores, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices = {
        row["device_key"]: row["id"]
        for row in await pg.fetch("SELECT device_key, id FROM devices WHERE device_key LIKE 'sim-json-0%'")
    }
    points = await pg.fetch(
        "SELECT device_id, id, label FROM datapoints WHERE device_id = ANY($1)", list(devices.values())
    )
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    # Every datapoint a reading a minute for 20 minutes; one datapoint of each device stops early.
    readings = [
        Reading(at + timedelta(minutes=m), p["device_id"], p["id"], float(m * 100 + n), p["label"])
        for n, p in enumerate(points)
        for m in range(20 if n % 3 else 8)
    ]
    await PostgresTimeseriesWriter(stores).write(DecodedBatch(readings=readings))
    monkeypatch.setattr(hot_state, "READ_PAGE", 4)  # several pages per device
    by_sql, by_reads = latest_from_postgres(stores.postgres), latest_through_reads(stores, "postgres")
    since = at + timedelta(minutes=5)
    some = set(list(devices.values())[:2])

    def key(found: list[Reading]) -> list[Reading]:
        return sorted(found, key=lambda r: (r.device_id, r.datapoint_id))

    for chosen in (some, None):
        sql = key(await by_sql(chosen, since))
        assert sql and key(await by_reads(chosen, since)) == sql
    assert {r.device_id for r in await by_reads(some, since)} == some
