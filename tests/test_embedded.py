"""worker.tools.embedded starts real PostgreSQL, Redis and MQTT services that answer real clients."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import asyncpg
import pytest
import redis.asyncio as aioredis
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from worker.tools.embedded import EmbeddedServices, ServiceUrls, free_port

from .conftest import services_dir

# A module-scoped fixture: on one worker only (tests/xdist_groups.py).
pytestmark = pytest.mark.shares("embedded-module")


@pytest.fixture(scope="module")
def services() -> Iterator[ServiceUrls]:
    with services_dir("embedded") as root, EmbeddedServices(root) as svc:
        yield svc.urls


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_urls_have_the_documented_shape(services: ServiceUrls) -> None:
    assert services.postgres_url.startswith("postgresql://iotflow@127.0.0.1:")
    assert services.postgres_url.endswith("/iotflow")
    assert services.redis_url.startswith("redis://127.0.0.1:")
    assert services.redis_url.endswith("/0")
    assert services.mqtt_url.startswith("mqtt://127.0.0.1:")


@pytest.mark.asyncio
async def test_postgres_answers(services: ServiceUrls) -> None:
    conn = await asyncpg.connect(services.postgres_url, timeout=10)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == "iotflow"
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_redis_answers(services: ServiceUrls) -> None:
    client = aioredis.from_url(services.redis_url)
    try:
        assert await client.ping() is True
        await client.set("iotflow:test", "hello")
        assert await client.get("iotflow:test") == b"hello"
    finally:
        await client.aclose()


def _session_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300  # keep the session (and its queue) while offline
    return props


@pytest.mark.asyncio
async def test_mqtt_v5_qos1_reaches_a_persistent_session(services: ServiceUrls) -> None:
    host, port = services.mqtt_url.removeprefix("mqtt://").split(":")
    topic = f"iotflow/test/{uuid.uuid4().hex}"
    sub_id = f"sub-{uuid.uuid4().hex[:8]}"

    def subscriber() -> aiomqtt.Client:
        return aiomqtt.Client(
            host,
            int(port),
            identifier=sub_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=_session_props(),
        )

    # Subscribe, go offline, publish, come back: the broker must have queued the QoS 1 message.
    async with subscriber() as sub:
        await sub.subscribe(topic, qos=1)
    async with aiomqtt.Client(host, int(port), protocol=aiomqtt.ProtocolVersion.V5) as pub:
        await pub.publish(topic, b"reading-1", qos=1)
    async with subscriber() as sub:
        async with asyncio.timeout(10):
            message = await anext(aiter(sub.messages))
    assert message.topic.value == topic
    assert message.payload == b"reading-1"
    assert message.qos == 1


def test_restart_reuses_postgres_cluster_and_stop_is_idempotent(private_dir: Path) -> None:
    tmp_path = private_dir

    async def run(url: str, sql: str) -> object:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    svc = EmbeddedServices(tmp_path, redis=False, mqtt=False)
    try:
        urls = svc.start()
        assert urls.redis_url == "" and urls.mqtt_url == ""
        asyncio.run(run(urls.postgres_url, "CREATE TABLE kept AS SELECT 42 AS v"))
        pid = svc._running[0].proc.pid
        svc.stop()
        svc.stop()
    finally:
        svc.stop()  # idempotent, as checked above: a failure above leaves no server behind
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    version_file = tmp_path / "postgres" / "PG_VERSION"
    mtime = version_file.stat().st_mtime_ns

    with EmbeddedServices(tmp_path, redis=False, mqtt=False) as again:
        assert asyncio.run(run(again.urls.postgres_url, "SELECT v FROM kept")) == 42
    assert version_file.stat().st_mtime_ns == mtime  # no second initdb
