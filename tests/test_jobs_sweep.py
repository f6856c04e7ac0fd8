"""The offline sweep: silent devices go offline in Redis and PostgreSQL, one event per silence."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis

from jobs import tasks
from jobs.context import JobResources
from worker.stores.keys import RedisKeys

from .test_jobs_support import Clock, add_device, ctx_of, res, utc

__all__ = ["res"]

NOW = utc("2026-03-10 12:00")


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


async def online_device(
    pg: asyncpg.Connection,
    redis: aioredis.Redis,
    keys: RedisKeys,
    name: str,
    *,
    silent_s: int,
    max_silence_s: int | None = None,
    redis_silent_s: int | None = None,
) -> int:
    """A device online in both stores, last seen `silent_s` ago (Redis may have seen it later)."""
    device_id, _ = await add_device(pg, name, max_silence_s=max_silence_s)
    last_seen = NOW - timedelta(seconds=silent_s)
    await pg.execute(
        "UPDATE devices SET is_online = true, last_seen = $2 WHERE id = $1", device_id, last_seen
    )
    redis_seen = NOW - timedelta(seconds=silent_s if redis_silent_s is None else redis_silent_s)
    await redis.hset(
        keys.device_status(device_id),
        mapping={"status": "online", "last_seen": redis_seen.isoformat(), "is_online": 1},
    )
    await redis.zadd(keys.devices_online(), {str(device_id): redis_seen.timestamp()})
    return device_id


async def events(pg: asyncpg.Connection) -> list[int]:
    rows = await pg.fetch(
        "SELECT (doc->>'device_id')::int AS device_id FROM documents "
        "WHERE collection = 'event_logs' AND doc->>'event_type' = 'device.status_changed' ORDER BY 1"
    )
    return [row["device_id"] for row in rows]


async def test_silent_devices_are_marked_offline_once(
    pg: asyncpg.Connection, redis_client: aioredis.Redis, res: JobResources, clock: Clock
) -> None:
    keys = res.keys
    # Default silence is 300 s.
    own_limit = await online_device(pg, redis_client, keys, "own-limit", silent_s=120, max_silence_s=60)
    within = await online_device(pg, redis_client, keys, "within", silent_s=200)
    past_default = await online_device(pg, redis_client, keys, "past-default", silent_s=400)
    # PostgreSQL lags behind Redis, which recorded data 10 s ago: the device is not silent.
    fresh_in_redis = await online_device(
        pg, redis_client, keys, "fresh", silent_s=120, max_silence_s=60, redis_silent_s=10
    )
    already_off, _ = await add_device(pg, "already-off")
    await pg.execute(
        "UPDATE devices SET is_online = false, last_seen = $2 WHERE id = $1",
        already_off,
        NOW - timedelta(days=1),
    )

    result = await tasks.offline_sweep(ctx_of(res), period=NOW.isoformat())

    assert result["status"] == "done"
    assert result["devices"] == [own_limit, past_default]
    online = {row["id"] for row in await pg.fetch("SELECT id FROM devices WHERE is_online")}
    assert online == {within, fresh_in_redis}
    for device_id in (own_limit, past_default):
        status = await redis_client.hgetall(keys.device_status(device_id))
        assert status["status"] == "offline" and status["is_online"] == "0"
        assert 0 < await redis_client.ttl(keys.device_status(device_id)) <= 300
    assert (await redis_client.hgetall(keys.device_status(within)))["status"] == "online"
    members = await redis_client.zrange(keys.devices_online(), 0, -1)
    assert sorted(members) == sorted([str(within), str(fresh_in_redis)])
    assert await events(pg) == [own_limit, past_default]
    event = await res.docs.get(
        "event_logs", f"device.status_changed:{own_limit}:{(NOW - timedelta(seconds=120)).timestamp():.6f}"
    )
    assert event is not None
    assert event["details"]["from"] == "online" and event["details"]["to"] == "offline"
    assert event["details"]["max_silence_s"] == 60

    # A minute later the data Redis recorded is 70 s old, past that device's 60 s: it goes too.
    clock.now = NOW + timedelta(minutes=1)
    again = await tasks.offline_sweep(ctx_of(res), period=clock.now.isoformat())
    assert again["devices"] == [fresh_in_redis]
    # A late, old reading sets is_online again without moving last_seen (the writer does
    # that): swept again, with no second event for the same silence.
    await pg.execute("UPDATE devices SET is_online = true WHERE id = $1", own_limit)
    clock.now = NOW + timedelta(seconds=90)  # "within" is then 290 s silent, still allowed
    third = await tasks.offline_sweep(ctx_of(res), period=clock.now.isoformat())
    assert third["devices"] == [own_limit] and third["events"] == 0
    assert await events(pg) == sorted([own_limit, past_default, fresh_in_redis])
