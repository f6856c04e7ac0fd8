"""The Redis hot-state sink on its own: what one batch of many devices leaves in Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
import redis.asyncio as aioredis

from schemas.records import DecodedBatch, Reading
from worker.sinks import redis_state
from worker.sinks.redis_state import RedisHotStateWriter
from worker.stores import Stores

T0 = datetime(2026, 12, 2, 6, 0, 0, tzinfo=UTC)  # whole seconds: the ISO times keep ".000000"


async def test_one_batch_of_many_devices_sets_each_ones_hot_state(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_state, "DEVICES_PER_CALL", 3)  # 7 devices: three script calls
    keys, client = stores.keys, stores.redis
    readings = []
    for device in range(1, 8):
        at = T0 + timedelta(seconds=device)
        readings += [
            Reading(at, device, 10 * device, 0.1 + 0.2, "temp"),
            Reading(at, device, 10 * device + 1, 1e-05 * device, "rh/%"),
            Reading(at - timedelta(hours=1), device, 10 * device, -1.0, "temp"),  # older: loses
        ]
    pubsub = client.pubsub()
    await pubsub.psubscribe(keys.telemetry_channel(0).replace(":0:", ":*:"))
    try:
        assert await pubsub.get_message(timeout=5)  # subscribed
        await RedisHotStateWriter(client, keys).write(DecodedBatch(readings=readings))
        messages = []
        while len(messages) < 7:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert message is not None, f"{len(messages)} telemetry messages of 7"
            messages.append(message)
    finally:
        await pubsub.aclose()
    for device in range(1, 8):
        at = T0 + timedelta(seconds=device)
        latest = await client.hgetall(keys.device_latest(device))
        assert latest == {b"temp": b"0.30000000000000004", b"rh/%": orjson.dumps(1e-05 * device)}
        assert float(latest[b"rh/%"]) == 1e-05 * device  # the digits Python had, not Lua's 14
        assert await client.hget(keys.device_latest_times(device), "temp") == orjson.dumps(at.timestamp())
        status = await client.hgetall(keys.device_status(device))
        assert status == {b"status": b"online", b"last_seen": _iso(at), b"is_online": b"1"}
        assert await client.zscore(keys.devices_online(), str(device)) == at.timestamp()
        assert await client.ttl(keys.device_status(device)) > 0
        assert await client.ttl(keys.device_latest_times(device)) > 0
    bodies = {m["channel"]: orjson.loads(m["data"]) for m in messages}
    assert bodies[keys.telemetry_channel(4).encode()] == {
        "device_id": 4,
        "timestamp": (T0 + timedelta(seconds=4)).isoformat(timespec="microseconds"),
        "values": {"temp": 0.1 + 0.2, "rh/%": 4e-05},
    }


async def test_an_older_batch_replaces_nothing_newer(stores: Stores) -> None:
    keys, client = stores.keys, stores.redis
    sink = RedisHotStateWriter(client, keys)
    await sink.write(DecodedBatch(readings=[Reading(T0, 1, 1, 30.0, "temp")]))
    backlog = T0 - timedelta(hours=1)
    await sink.write(
        DecodedBatch(readings=[Reading(backlog, 1, 1, 10.0, "temp"), Reading(backlog, 1, 2, 5.0, "new")])
    )
    assert await client.hgetall(keys.device_latest(1)) == {b"temp": b"30.0", b"new": b"5.0"}
    assert await client.hget(keys.device_status(1), "last_seen") == _iso(T0)
    assert await client.zscore(keys.devices_online(), "1") == T0.timestamp()


async def test_a_device_with_more_labels_than_one_redis_call_takes(
    stores: Stores, redis_client: aioredis.Redis
) -> None:
    """Lua's `unpack` has a limit (~8,000 values): the script writes a device's labels in slices."""
    labels = [f"point{n}" for n in range(5000)]
    readings = [Reading(T0, 9, n, float(n), label) for n, label in enumerate(labels)]
    sink = RedisHotStateWriter(stores.redis, stores.keys)
    await sink.write(DecodedBatch(readings=readings))
    await sink.write(DecodedBatch(readings=readings))  # again: every label read back and compared
    latest = await redis_client.hgetall(stores.keys.device_latest(9))
    assert len(latest) == 5000
    assert latest["point4999"] == "4999.0"


def _iso(at: datetime) -> bytes:
    return at.isoformat(timespec="microseconds").encode()
