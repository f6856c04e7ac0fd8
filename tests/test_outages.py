"""A store that goes away: nothing is lost, nothing is acknowledged early, recovery is automatic."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from worker.config import Settings
from worker.pipeline import Daemon

from .helpers import publish, running_daemon, wait_for, wait_for_committed, wait_for_count
from .tcpproxy import TcpProxy

# One past instant per test run: every message of a test has its own millisecond after it.
BASE_MS = int(time.time() * 1000) - 3_600_000


def json_messages(start: int, count: int) -> list[tuple[str, bytes]]:
    return [
        (
            "devices/sim-json-01/telemetry",
            orjson.dumps({"ts": BASE_MS + n, "values": {"temperature": n}}),
        )
        for n in range(start, start + count)
    ]


async def proxied(url: str) -> tuple[TcpProxy, str]:
    parsed = urlparse(url)
    proxy = TcpProxy(parsed.hostname or "127.0.0.1", parsed.port or 5432)
    await proxy.start()
    return proxy, url.replace(f"{parsed.hostname}:{parsed.port}", f"127.0.0.1:{proxy.port}")


async def test_postgres_outage_holds_messages_and_recovers(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    proxy, url = await proxied(settings.postgres.url)
    settings.postgres = replace(settings.postgres, url=url)
    try:
        async with running_daemon(settings) as daemon:
            await publish(settings.mqtt.url, json_messages(0, 100))
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 100)
            await wait_for_committed(daemon, 100)

            proxy.cut()
            await publish(settings.mqtt.url, json_messages(100, 400))
            assert daemon.pipeline is not None
            writer = daemon.pipeline.writer
            await wait_for(lambda: _true(bool(writer.down)))
            await wait_for(lambda: _received(daemon, 500))  # it holds all of them now ...
            await asyncio.sleep(1.0)  # ... and would have acknowledged some by now, were it wrong
            assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 100
            readiness = await daemon.pipeline.readiness()
            assert readiness["postgres"] is False and readiness["sinks"] is False
            committed_during_outage = daemon.metrics.counters["messages_committed"]
            assert committed_during_outage == 100  # nothing acknowledged while the store is away

            await proxy.restore()
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 500, timeout=30)
            await wait_for(lambda: _true(not writer.down))
        assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 500
    finally:
        await proxy.stop()


@pytest.mark.parametrize("outage", ["refused", "frozen"])
async def test_a_redis_outage_does_not_stop_durable_ingest_and_hot_state_is_rebuilt(
    settings: Settings, pg: asyncpg.Connection, outage: str
) -> None:
    """Redis hot state is derived (docs/storage.md): while Redis is away (refusing
    connections, or accepting and never answering) every message is stored in PostgreSQL
    and acknowledged; once it returns, the latest values are rebuilt from `decoded_data`,
    so hot state equals the newest readings."""
    proxy, url = await proxied(settings.redis.url)
    redis_url = settings.redis.url
    settings.redis = replace(settings.redis, url=url)
    settings.storage = replace(settings.storage, write_timeout_s=2.0)
    try:
        async with running_daemon(settings) as daemon:
            metrics = daemon.metrics
            await publish(settings.mqtt.url, json_messages(0, 50))
            await wait_for_committed(daemon, 50)
            device_id = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'sim-json-01'")
            latest_key = f"{settings.redis.key_prefix}device:latest:{device_id}"
            async with aioredis.Redis.from_url(redis_url, decode_responses=True) as direct:
                await wait_for(lambda: _equals(direct.hget(latest_key, "temperature"), "49.0"))

                if outage == "refused":
                    proxy.cut()
                else:
                    proxy.freeze()
                await publish(settings.mqtt.url, json_messages(50, 150))
                # Acknowledged while Redis is away: stored in PostgreSQL, hot state skipped.
                await wait_for_committed(daemon, 200, timeout=30)
                assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 200
                # The acks did not wait for hot state: a frozen Redis is given up on only at
                # storage.write_timeout_s, which may come after the last ack.
                await wait_for(lambda: _true(metrics.count("hot_state_skipped") >= 1), timeout=30)
                assert metrics.gauges["hot_state_stale"]() == 1.0
                assert await direct.hget(latest_key, "temperature") == "49.0"  # stale, as expected

                if outage == "refused":
                    await proxy.restore()
                else:
                    proxy.thaw()
                await wait_for(lambda: _true(metrics.gauges["hot_state_stale"]() == 0.0), timeout=30)
                assert metrics.count("hot_state_rebuilt") >= 1
                assert await direct.hget(latest_key, "temperature") == "199.0"
                newest = float(
                    await direct.hget(
                        f"{settings.redis.key_prefix}device:latest_ts:{device_id}", "temperature"
                    )
                )
                assert newest == (BASE_MS + 199) / 1000
        assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 200
    finally:
        await proxy.stop()


async def test_during_a_redis_outage_the_worker_is_ready_and_says_redis_is_degraded(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """Redis is derivable: while it refuses connections durable ingest goes on, so /readyz
    answers 200 with `"degraded": ["redis"]`, as both mode does for Cassandra; PostgreSQL
    away is still 503 (tests/test_both_mode.py)."""
    proxy, url = await proxied(settings.redis.url)
    settings.redis = replace(settings.redis, url=url)
    settings.storage = replace(settings.storage, write_timeout_s=2.0)
    settings.http = replace(settings.http, enabled=True, port=0)
    try:
        async with running_daemon(settings) as daemon:
            assert daemon.http is not None
            port = daemon.http.port
            proxy.cut()
            await publish(settings.mqtt.url, json_messages(0, 20))
            await wait_for_committed(daemon, 20, timeout=30)  # acknowledged: stored in PostgreSQL

            async def redis_down() -> bool:
                return (await asyncio.to_thread(readyz, port))[1]["checks"]["redis"] is False

            await wait_for(redis_down)
            status, readiness = await asyncio.to_thread(readyz, port)
            assert status == 200, readiness
            assert readiness["ready"] is True and readiness["degraded"] == ["redis"]
            assert readiness["checks"]["postgres"] is True

            await proxy.restore()

            async def redis_back() -> bool:
                return (await asyncio.to_thread(readyz, port))[1]["degraded"] == []

            await wait_for(redis_back, timeout=30)
        assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 20
    finally:
        await proxy.stop()


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return bool(await value == expected)


async def _true(value: bool) -> bool:
    return value


async def _received(daemon: Daemon, count: int) -> bool:
    return bool(daemon.metrics.counters["messages_received"] >= count)


@contextlib.asynccontextmanager
async def daemon_behind_proxy(settings: Settings) -> AsyncIterator[tuple[Daemon, TcpProxy]]:
    """A running daemon that reaches the broker through a proxy the test can cut."""
    settings.mqtt.reconnect_min_s = 0.1
    proxy, url = await proxied(settings.mqtt.url)
    settings.mqtt = replace(settings.mqtt, url=url)
    try:
        async with running_daemon(settings) as daemon:
            yield daemon, proxy
    finally:
        await proxy.stop()


@pytest.mark.usefixtures("broker_settings")
async def test_broker_connection_loss_reconnects_and_the_session_keeps_the_messages(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    broker_url = settings.mqtt.url
    async with daemon_behind_proxy(settings) as (daemon, proxy):
        assert daemon.pipeline is not None
        intake = daemon.pipeline.intake
        await publish(broker_url, json_messages(0, 50))
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 50)

        proxy.cut()  # the worker loses the broker; publishers still reach it
        await wait_for(lambda: _true(not intake.connected))
        await publish(broker_url, json_messages(50, 150))
        await asyncio.sleep(0.5)
        assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 50

        await proxy.restore()  # the persistent session hands over what waited
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 200, timeout=30)
        assert intake.connected
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 200


@pytest.mark.usefixtures("broker_settings")
async def test_a_session_backlog_beyond_receive_maximum_does_not_hold_up_the_suback(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """A resumed session gets up to Receive Maximum of its waiting messages before the SUBACK,
    which comes behind them: intake must read them meanwhile, or it never sees the SUBACK."""
    settings.mqtt.receive_maximum = 20
    broker_url = settings.mqtt.url
    async with daemon_behind_proxy(settings) as (daemon, proxy):
        assert daemon.pipeline is not None
        intake = daemon.pipeline.intake
        await publish(broker_url, json_messages(0, 10))
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 10)
        proxy.cut()
        await wait_for(lambda: _true(not intake.connected))
        await publish(broker_url, json_messages(10, 200))  # ten times Receive Maximum waits
        await proxy.restore()
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 210, timeout=30)
        await wait_for(lambda: _true(intake.connected))


async def test_a_device_first_seen_during_a_postgres_outage_waits_for_it(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    proxy, url = await proxied(settings.postgres.url)
    settings.postgres = replace(settings.postgres, url=url)
    try:
        async with running_daemon(settings) as daemon:
            pipeline = daemon.pipeline
            proxy.cut()
            # Not in any cache yet: decoding it needs PostgreSQL, which is away.
            await publish(settings.mqtt.url, [("devices/sim-json-03/telemetry", b'{"temperature": 4.5}')])
            await wait_for(lambda: _received(daemon, 1))  # in the decoder's hands ...
            await asyncio.sleep(1.5)  # ... long enough to crash, were it to
            assert daemon.supervisor.restarts_total == 0, "the pipeline was restarted instead of waiting"
            assert daemon.pipeline is pipeline
            assert daemon.metrics.counters["messages_committed"] == 0
            await proxy.restore()
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 1, timeout=30)
        assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0
    finally:
        await proxy.stop()


async def test_memory_stays_bounded_while_postgres_is_away(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """Every in-process queue stops at its bound; the broker holds the rest."""
    settings.pipeline.mailbox_size = 100
    settings.mqtt.receive_maximum = 300
    proxy, url = await proxied(settings.postgres.url)
    settings.postgres = replace(settings.postgres, url=url)
    try:
        async with running_daemon(settings) as daemon:
            assert daemon.pipeline is not None
            pipeline = daemon.pipeline
            await publish(settings.mqtt.url, json_messages(0, 10))
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 10)
            proxy.cut()
            # 900: a stock Mosquitto (max_queued_messages 1000) must be able to hold them too.
            await publish(settings.mqtt.url, json_messages(10, 900))
            # More than the raw mailbox holds: the whole pipeline is full ...
            await wait_for(lambda: _received(daemon, 10 + settings.pipeline.mailbox_size + 1))
            await asyncio.sleep(1.5)  # ... and would have overrun a bound by now, were it to
            taken = daemon.metrics.counters["messages_received"] - 10
            # Unacknowledged messages in the process never exceed Receive Maximum…
            assert taken + pipeline.intake.buffered <= settings.mqtt.receive_maximum
            assert pipeline.raw.qsize() <= settings.pipeline.mailbox_size
            assert pipeline.decoded.qsize() <= pipeline.decoded.maxsize
            # …so the other ~600 wait in the broker, and arrive once PostgreSQL is back.
            await proxy.restore()
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 910, timeout=60)
    finally:
        await proxy.stop()
