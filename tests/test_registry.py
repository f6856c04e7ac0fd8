"""The registry: a bounded negative cache, datapoint ranges through both caches."""

from __future__ import annotations

import asyncpg
import pytest

from worker.decode import registry
from worker.decode.parse import DeviceRef
from worker.decode.registry import DeviceRegistry
from worker.stores import Stores


def test_negative_cache_purges_expired_entries_and_caps_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "NEGATIVE_CACHE_MAX", 100)
    cache: dict[str, float] = {}
    for n in range(100):
        registry._remember_unknown(cache, f"old{n}", now=0.0)  # expire at 30.0
    registry._remember_unknown(cache, "new", now=100.0)
    assert list(cache) == ["new"]  # the expired hundred went

    for n in range(99):
        registry._remember_unknown(cache, f"live{n}", now=100.0)
    registry._remember_unknown(cache, "one-too-many", now=100.0)
    assert len(cache) <= 100


async def test_datapoint_ranges_load_from_postgres_and_ride_the_redis_cache(
    stores: Stores, pg: asyncpg.Connection
) -> None:
    device_id = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'sim-json-01'")
    await pg.execute(
        "UPDATE datapoints SET min_value = 2, max_value = 4.5 WHERE device_id = $1 AND label = 'battery'",
        device_id,
    )
    await pg.execute(
        "UPDATE datapoints SET min_value = -40 WHERE device_id = $1 AND label = 'temperature'", device_id
    )
    ref = DeviceRef("key", "sim-json-01")
    expected = {"battery": (2.0, 4.5), "temperature": (-40.0, None)}

    def fresh() -> DeviceRegistry:  # a new process: empty process cache, shared Redis
        return DeviceRegistry(stores.postgres, stores.redis, stores.keys, register_unknown=False)

    assert (await fresh().resolve([ref]))[ref].ranges == expected
    # PostgreSQL changes behind the cache: a second process still gets the ranges, from Redis.
    await pg.execute("UPDATE datapoints SET min_value = NULL, max_value = NULL")
    assert (await fresh().resolve([ref]))[ref].ranges == expected
    # A cache entry without ranges (written before they existed) is a miss, not "no ranges".
    await stores.redis.delete(stores.keys.device_ranges(device_id))
    assert (await fresh().resolve([ref]))[ref].ranges == {}


@pytest.mark.parametrize(
    ("low", "high"), [(float("nan"), None), (None, float("inf")), (5.0, 1.0), (float("-inf"), 0.0)]
)
async def test_datapoints_refuse_unusable_ranges(pg: asyncpg.Connection, low: object, high: object) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute("UPDATE datapoints SET min_value = $1, max_value = $2", low, high)
