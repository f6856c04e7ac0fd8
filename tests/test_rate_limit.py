"""Per-device rate limits: the excess is dead-lettered (never dropped), other devices are
unaffected, and every worker sharing the Redis shares the limit."""

from __future__ import annotations

import time
from dataclasses import replace

import asyncpg
import orjson
import redis.asyncio as aioredis

from worker.config import Settings
from worker.decode.ratelimit import RateLimiter
from worker.stores import Stores
from worker.stores.keys import RedisKeys

from .helpers import publish, running_daemon, wait_for

# A window no test run can cross: the verdict must not depend on the wall clock's second.
FOREVER_S = 10**9
BASE_MS = int(time.time() * 1000) - 600_000


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_two_workers_share_one_limit_per_device_and_window(stores: Stores) -> None:
    clock = Clock(1_000_000.0)
    first = RateLimiter(stores.redis, stores.keys, 10, 60, clock)
    second = RateLimiter(stores.redis, stores.keys, 10, 60, clock)  # another worker, same Redis
    assert await first.admit({1: 6, 2: 3}) == {1: 6, 2: 3}
    assert await second.admit({1: 6, 2: 3}) == {1: 4, 2: 3}
    assert await first.admit({1: 1}) == {1: 0}
    clock.now += 60  # the next window starts afresh
    assert await second.admit({1: 12}) == {1: 10}


async def test_with_redis_away_each_worker_limits_on_its_own(settings: Settings) -> None:
    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)  # nothing listens on 1
    try:
        limiter = RateLimiter(unreachable, RedisKeys(settings.redis.key_prefix), 5, 60, Clock(0.0))
        assert await limiter.admit({7: 3}) == {7: 3}
        assert await limiter.admit({7: 3}) == {7: 2}  # still limited, by this process's count
    finally:
        await unreachable.aclose()


def telemetry(device: str, start: int, count: int) -> list[tuple[str, bytes]]:
    return [
        (f"devices/{device}/telemetry", orjson.dumps({"ts": BASE_MS + n, "values": {"temperature": n}}))
        for n in range(start, start + count)
    ]


async def test_a_flooding_device_is_limited_while_the_others_get_through(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    settings.pipeline = replace(settings.pipeline, rate_limit_messages=20, rate_limit_window_s=FOREVER_S)
    flood, calm = telemetry("sim-json-01", 0, 50), telemetry("sim-json-02", 0, 10)
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, [*flood[:25], *calm, *flood[25:]])

        async def all_committed() -> bool:
            return daemon.metrics.counters["messages_committed"] == 60

        await wait_for(all_committed)
        limited = daemon.metrics.counters["rate_limited"]
    rows = dict(
        await pg.fetch(
            "SELECT v.device_key, count(*) FROM decoded_data d JOIN devices v ON v.id = d.device_id GROUP BY 1"
        )
    )
    assert rows == {"sim-json-01": 20, "sim-json-02": 10}
    reasons = [r["reason"] for r in await pg.fetch("SELECT reason FROM dead_letters")]
    assert len(reasons) == 30 and all(r.startswith("rate_limited: device ") for r in reasons)
    assert limited == 30
