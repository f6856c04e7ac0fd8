"""The rules actor and the alert sink on real stores, with a controllable clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from schemas.records import DecodedBatch, Reading
from worker.config import Settings
from worker.db import create_pool
from worker.metrics import Metrics
from worker.rules.actor import RulesActor
from worker.rules.admin import RuleAdmin, open_admin
from worker.rules.model import Scope
from worker.runtime.mailbox import Mailbox
from worker.sinks.alerts import AlertSink

from .helpers import wait_for, wait_for_count

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
ALERTS = "SELECT count(*) FROM documents WHERE collection = 'alerts'"


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Harness:
    """A rules actor between two mailboxes; `forward` plays the writer with a real AlertSink."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, clock: Clock) -> None:
        self.outbox: Mailbox[DecodedBatch] = Mailbox(16)
        self.actor = RulesActor(settings, self.outbox, pool, Metrics(), clock=clock)
        self.inbox = self.actor.mailbox
        self.sink = AlertSink(settings)
        self.task = asyncio.create_task(self.actor.run())

    async def send(self, device_id: int, user_id: int, at: datetime, value: float) -> DecodedBatch:
        batch = DecodedBatch(
            readings=[Reading(at, device_id, 1, value, "temperature")],
            messages=1,
            device_users={device_id: user_id},
        )
        await self.inbox.put(batch)
        (out,) = await self.outbox.get_batch(1, 5)
        return out

    async def stop(self) -> None:
        await self.actor.stop()
        await self.actor.close()
        await self.sink.close()
        await self.task


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    opened = await create_pool(settings.postgres, min_size=1, max_size=2)
    yield opened
    await opened.close()


@pytest.fixture
async def admin(settings: Settings) -> AsyncIterator[RuleAdmin]:
    async with open_admin(settings) as opened:
        yield opened


@pytest.fixture
async def device(pg: asyncpg.Connection) -> tuple[int, int]:
    row = await pg.fetchrow("SELECT id, user_id FROM devices WHERE device_key = 'sim-json-02'")
    assert row is not None
    return row["id"], row["user_id"]


async def test_offline_detection_follows_the_injected_clock_and_survives_a_restart(
    settings: Settings,
    pg: asyncpg.Connection,
    pool: asyncpg.Pool,
    admin: RuleAdmin,
    device: tuple[int, int],
    redis_client: aioredis.Redis,
) -> None:
    device_id, user_id = device
    settings.rules = replace(settings.rules, offline_check_s=0.02)
    await admin.set_rule(Scope("device", device_id), {"id": "silent", "type": "offline", "duration": "10m"})
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(f"{settings.redis.key_prefix}channel:user:{user_id}:notifications")
    clock = Clock(T0)
    harness = Harness(settings, pool, clock)
    try:
        await harness.send(device_id, user_id, T0, 20.0)
        clock.now = T0 + timedelta(seconds=599)
        await asyncio.sleep(0.2)  # ten offline checks at least
        assert await pg.fetchval(ALERTS) == 0
        clock.now = T0 + timedelta(seconds=600)
        await wait_for_count(pg, ALERTS, 1, timeout=5)
    finally:
        await harness.stop()
    doc = orjson.loads(await pg.fetchval("SELECT doc FROM documents WHERE collection = 'alerts'"))
    assert (doc["alert_type"], doc["status"], doc["user_id"]) == ("offline", "active", user_id)
    assert datetime.fromisoformat(doc["fired_at"]) == T0 + timedelta(seconds=600)
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    message = message or await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert message is not None and orjson.loads(message["data"])["event"] == "alert.fired"
    await pubsub.aclose()

    clock.now = T0 + timedelta(hours=5)  # restarted much later: still the same single alert
    harness = Harness(settings, pool, clock)
    try:
        await asyncio.sleep(0.2)
        assert await pg.fetchval(ALERTS) == 1
        out = await harness.send(device_id, user_id, clock.now, 21.0)
        assert [e.kind for e in out.alerts] == ["resolved"]
        await harness.sink.write(out)
    finally:
        await harness.stop()
    status = await pg.fetchval("SELECT doc->>'status' FROM documents WHERE collection = 'alerts'")
    assert status == "resolved"


async def test_a_withdrawal_stored_before_its_alert_still_resolves_it(
    settings: Settings, pg: asyncpg.Connection, pool: asyncpg.Pool, admin: RuleAdmin, device: tuple[int, int]
) -> None:
    device_id, user_id = device
    scope = Scope("device", device_id)
    await admin.set_rule(
        scope, {"id": "hot", "type": "threshold", "field": "temperature", "condition": ">", "value": 30}
    )
    harness = Harness(settings, pool, Clock(T0))
    try:
        held = await harness.send(device_id, user_id, T0, 35.0)  # the writer has not stored it yet
        assert [e.kind for e in held.alerts] == ["fired"]
        await admin.delete_rule(scope, "hot")  # the actor writes the withdrawal directly
        await wait_for_count(pg, "SELECT count(*) FROM documents WHERE collection = 'event_logs'", 1)
        await harness.sink.write(held)
    finally:
        await harness.stop()
    doc = orjson.loads(await pg.fetchval("SELECT doc FROM documents WHERE collection = 'alerts'"))
    assert doc["status"] == "resolved" and doc["resolution"]["reason"] == "rule_withdrawn"


async def test_the_sink_is_idempotent_and_announces_what_a_crash_left_unannounced(
    settings: Settings, pg: asyncpg.Connection, pool: asyncpg.Pool, admin: RuleAdmin, device: tuple[int, int]
) -> None:
    device_id, user_id = device
    await admin.set_rule(
        Scope("device", device_id),
        {"id": "hot", "type": "threshold", "field": "temperature", "condition": ">", "value": 30},
    )
    harness = Harness(settings, pool, Clock(T0))
    try:
        batch = await harness.send(device_id, user_id, T0, 35.0)
    finally:
        await harness.stop()
    recent = f"{settings.redis.key_prefix}alerts:{device_id}"
    client = aioredis.Redis.from_url(settings.redis.url)
    sink = AlertSink(settings)
    try:
        await sink.write(batch)
        await sink.write(batch)  # the writer retrying, or the broker redelivering
        assert await pg.fetchval(ALERTS) == 1
        assert await client.llen(recent) == 1
        # A crash after the documents were stored but before Redis heard of them:
        await client.delete(recent)
        await pg.execute(
            "UPDATE documents SET doc = doc || '{\"notified\": false}' WHERE collection = 'event_logs'"
        )
        await sink.write(batch)
        await wait_for(lambda: _llen_is(client, recent, 1))
        assert await pg.fetchval(ALERTS) == 1
    finally:
        await sink.close()
        await client.aclose()


async def _llen_is(client: aioredis.Redis, key: str, expected: int) -> bool:
    return bool(await client.llen(key) == expected)
