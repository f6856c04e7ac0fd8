"""An idle worker is quiet, and its rules' pub/sub listener still notices a lost connection.

The Redis client's socket timeout and health-check interval are shortened here, so a
read that times out on a quiet channel would show many times over within seconds: the
idle window below spans many of both, standing in for a minute at the real ones.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from worker.config import Settings
from worker.rules.source import rules_channel
from worker.stores import redis as redis_store
from worker.stores.keys import RedisKeys

from .helpers import running_daemon, schema_documents, wait_for
from .test_outages import proxied

SHORT_S = 0.2  # the socket timeout and the health-check interval, while a test runs
IDLE_S = 40 * SHORT_S
LOUD = {"warning", "error", "critical", "exception"}


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "SOCKET_TIMEOUT_S", SHORT_S)
    monkeypatch.setattr(redis_store, "HEALTH_CHECK_S", SHORT_S, raising=False)


async def _listeners(client: aioredis.Redis, settings: Settings) -> int:
    ((_, count),) = await client.pubsub_numsub(rules_channel(RedisKeys(settings.redis.key_prefix)))
    return int(count)


async def test_an_idle_worker_logs_nothing_at_warning_or_above(
    settings: Settings, redis_client: aioredis.Redis, short_timeouts: None
) -> None:
    with capture_logs() as logs:
        async with running_daemon(settings):
            await wait_for(lambda: _subscribed(redis_client, settings))
            await asyncio.sleep(IDLE_S)  # idle: nothing published, nothing announced
            assert await _listeners(redis_client, settings) == 1  # still listening, on one connection
    loud = [entry for entry in logs if entry["log_level"] in LOUD]
    assert loud == []


async def test_a_killed_pubsub_connection_is_noticed_and_the_rules_reloaded(
    settings: Settings, pg: asyncpg.Connection, redis_client: aioredis.Redis, short_timeouts: None
) -> None:
    settings.rules = replace(settings.rules, refresh_s=3600)  # only the reconnection can reload
    device_id = await pg.fetchval("SELECT id FROM devices ORDER BY id LIMIT 1")
    hot = {"id": "hot", "type": "threshold", "field": "temperature", "condition": ">", "value": 30}
    async with schema_documents(settings) as documents:
        with capture_logs() as logs:
            async with running_daemon(settings) as daemon:
                await wait_for(lambda: _subscribed(redis_client, settings))
                # A change made while the announcement could not arrive: no publish at all.
                await documents.upsert(
                    "device_configs",
                    f"device:{device_id}",
                    {"device_id": device_id, "settings": {"alerts": [hot]}},
                )
                await asyncio.sleep(4 * SHORT_S)  # a few health checks: none of them reloads
                assert daemon.metrics.gauges["rules_loaded"]() == 0
                killed = await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                assert killed >= 1

                async def reloaded() -> bool:
                    return bool(daemon.metrics.gauges["rules_loaded"]() == 1)

                await wait_for(reloaded)
                await wait_for(lambda: _subscribed(redis_client, settings))
        assert any(entry["event"] == "rules.announcements_lost" for entry in logs)


async def test_a_redis_that_stops_answering_is_noticed_by_the_health_check(
    settings: Settings, redis_client: aioredis.Redis, short_timeouts: None
) -> None:
    proxy, url = await proxied(settings.redis.url)
    settings.redis = replace(settings.redis, url=url)
    try:
        with capture_logs() as logs:
            async with running_daemon(settings):
                await wait_for(lambda: _subscribed(redis_client, settings))
                proxy.mute()  # the connection stays open; no answer comes back, no error either

                async def lost() -> bool:
                    return any(entry["event"] == "rules.announcements_lost" for entry in logs)

                await wait_for(lost)
                proxy.thaw()
                await wait_for(lambda: _subscribed(redis_client, settings))
    finally:
        await proxy.stop()


async def _subscribed(client: aioredis.Redis, settings: Settings) -> bool:
    return await _listeners(client, settings) == 1
