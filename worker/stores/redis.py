"""Redis clients: the one place that connects to Redis (besides arq's own queue connection)."""

from __future__ import annotations

import redis.asyncio as aioredis

from worker.config import RedisSettings

SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# How often an idle connection is checked with a PING: a pub/sub listener waits for
# messages without a read timeout, so this is how it notices a dead connection.
HEALTH_CHECK_S = 30.0


def redis_client(settings: RedisSettings) -> aioredis.Redis:
    """A client with timeouts, so a hung server is noticed; it connects on first use."""
    return aioredis.Redis.from_url(
        settings.url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        health_check_interval=HEALTH_CHECK_S,
    )


async def delete_matching(settings: RedisSettings, pattern: str) -> int:
    """Delete every key matching `pattern` (SCAN, then DEL in chunks); return how many."""
    client = redis_client(settings)
    deleted = 0
    try:
        keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
        for start in range(0, len(keys), 1000):
            deleted += await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()
    return deleted
