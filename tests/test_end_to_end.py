"""Simulator → broker → worker → PostgreSQL rows and Redis hot state, over real services."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from worker.config import Settings
from worker.decode.codecs import load_codecs
from worker.tools import fleet
from worker.tools.simulate import build_fleet, message_stream, readings_per_message

from .helpers import publish, running_daemon, wait_for, wait_for_count


def simulated_messages(count: int, devices: int = 8) -> list[tuple[str, bytes]]:
    stream = message_stream(build_fleet(devices), load_codecs())
    return [next(stream) for _ in range(count)]


async def test_simulated_fleet_lands_in_postgres_and_redis(
    settings: Settings, pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    codecs = load_codecs()
    messages = simulated_messages(240)
    expected = sum(readings_per_message(t, p, codecs) for t, p in messages)
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, messages)
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", expected)
        # The rows show before the batch's other sinks finish and the counter moves.
        counters = daemon.metrics.counters
        await wait_for(lambda: asyncio.sleep(0, counters["messages_committed"] >= len(messages)))
        assert counters["messages_committed"] == len(messages)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0

    # Values are the simulator's, decoded through the same codecs.
    temperature = await pg.fetchval(
        "SELECT value FROM decoded_data d JOIN datapoints p ON p.id = d.datapoint_id "
        "JOIN devices v ON v.id = d.device_id WHERE v.mac = $1 AND p.label = 'room1.temperature' "
        "ORDER BY timestamp DESC LIMIT 1",
        fleet.F2_MACS[0],
    )
    assert 15 < temperature < 30

    device_id = await pg.fetchval("SELECT id FROM devices WHERE mac = $1", fleet.F2_MACS[0])
    prefix = settings.redis.key_prefix
    latest = await redis_client.hgetall(f"{prefix}device:latest:{device_id}")
    assert abs(float(latest["room1.temperature"]) - temperature) < 1e-9
    status = await redis_client.hgetall(f"{prefix}device:status:{device_id}")
    assert status["status"] == "online" and status["is_online"] == "1"
    online = await redis_client.zrange(f"{prefix}devices:online", 0, -1)
    assert len(online) == 8
    last_seen = await pg.fetchval("SELECT count(*) FROM devices WHERE is_online AND last_seen IS NOT NULL")
    assert last_seen == 8


async def test_redelivered_messages_add_no_rows(settings: Settings, pg: asyncpg.Connection) -> None:
    messages = simulated_messages(50)
    codecs = load_codecs()
    expected = sum(readings_per_message(t, p, codecs) for t, p in messages)
    async with running_daemon(settings):
        await publish(settings.mqtt.url, messages)
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", expected)
        await publish(settings.mqtt.url, messages)  # the same messages again, as after a crash
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", expected)
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == expected


async def test_telemetry_channel_announces_each_batch(settings: Settings, pg: asyncpg.Connection) -> None:
    device_id = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'sim-json-01'")
    client = aioredis.Redis.from_url(settings.redis.url)
    pubsub = client.pubsub()
    await pubsub.subscribe(f"{settings.redis.key_prefix}channel:device:{device_id}:telemetry")
    try:
        async with running_daemon(settings):
            payload = orjson.dumps({"temperature": 22.5, "humidity": 40})
            await publish(settings.mqtt.url, [("devices/sim-json-01/telemetry", payload)])
            message = None
            for _ in range(100):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if message:
                    break
            assert message is not None, "no telemetry notification"
            body = orjson.loads(message["data"])
            assert body["device_id"] == device_id
            assert body["values"] == {"temperature": 22.5, "humidity": 40.0}
    finally:
        await pubsub.aclose()
        await client.aclose()
        await asyncio.sleep(0)


async def test_a_backlog_upload_does_not_replace_newer_hot_state(
    settings: Settings, pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    device_id = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'sim-json-02'")
    now_ms = int(time.time() * 1000)
    live = orjson.dumps({"ts": now_ms, "values": {"temperature": 30.0}})
    # A gateway catching up an hour later: older samples, arriving after the live one.
    backlog = orjson.dumps(
        [{"ts": now_ms - 3_600_000 + n, "values": {"temperature": 10.0 + n}} for n in range(3)]
    )
    async with running_daemon(settings):
        await publish(settings.mqtt.url, [("devices/sim-json-02/telemetry", live)])
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 1)
        await publish(settings.mqtt.url, [("devices/sim-json-02/telemetry", backlog)])
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 4)
    prefix = settings.redis.key_prefix
    assert await redis_client.hget(f"{prefix}device:latest:{device_id}", "temperature") == "30.0"
    status = await redis_client.hgetall(f"{prefix}device:status:{device_id}")
    assert datetime.fromisoformat(status["last_seen"]).timestamp() == pytest.approx(now_ms / 1000)
    score = await redis_client.zscore(f"{prefix}devices:online", str(device_id))
    assert score == pytest.approx(now_ms / 1000)
