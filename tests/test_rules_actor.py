"""The rules actor and the alert sink on real stores, with a controllable clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from schemas.records import AlertEvent, DecodedBatch, Reading
from worker.config import Settings
from worker.metrics import Metrics
from worker.rules.actor import RulesActor
from worker.rules.admin import RuleAdmin
from worker.rules.evaluator import Evaluator
from worker.rules.model import Scope, parse_rule
from worker.rules.ruleset import RuleSet
from worker.rules.source import rules_channel
from worker.runtime.mailbox import Mailbox
from worker.sinks.alerts import AlertSink
from worker.stores import Stores, open_stores
from worker.stores.documents import PostgresDocumentStore
from worker.stores.keys import RedisKeys

from .helpers import background, wait_for, wait_for_count
from .test_outages import proxied

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
ALERTS = "SELECT count(*) FROM documents WHERE collection = 'alerts'"


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Harness:
    """A rules actor between two mailboxes; `forward` plays the writer with a real AlertSink."""

    def __init__(self, stores: Stores, clock: Clock) -> None:
        self.outbox: Mailbox[DecodedBatch] = Mailbox(16)
        self.sink = AlertSink(stores)
        self.actor = RulesActor(stores, self.outbox, Metrics(), self.sink, clock=clock)
        # A busy machine can hold up an event loop past the default (1 s), and a stall
        # holds offline silence, which the injected clock would never make up for: only
        # the test about stalls has them, and decides when.
        self.actor.stall_s = 3600
        self.inbox = self.actor.mailbox
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


class OfflineChecks:
    """Counts the actor's offline checks, and keeps what each found."""

    def __init__(self, actor: RulesActor) -> None:
        evaluator = actor.evaluator
        assert evaluator is not None, "the actor has not started"
        check = evaluator.check_offline
        self.found: list[list[AlertEvent]] = []

        def counted() -> list[AlertEvent]:
            events = check()
            self.found.append(events)
            return events

        evaluator.check_offline = counted  # type: ignore[method-assign]

    @classmethod
    async def of(cls, actor: RulesActor) -> OfflineChecks:
        await wait_for(lambda: _true(actor.evaluator is not None))
        return cls(actor)

    async def wait(self, count: int) -> None:
        """Until `count` more checks have run (each one's alerts are written before the next)."""
        target = len(self.found) + count
        await wait_for(lambda: _true(len(self.found) >= target))

    def fired(self) -> list[AlertEvent]:
        return [event for events in self.found for event in events]


async def _true(value: bool) -> bool:
    return value


async def next_message(pubsub: aioredis.client.PubSub, timeout: float = 20.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message:
            return message
    return None


@pytest.fixture
async def device(pg: asyncpg.Connection) -> tuple[int, int]:
    row = await pg.fetchrow("SELECT id, user_id FROM devices WHERE device_key = 'sim-json-02'")
    assert row is not None
    return row["id"], row["user_id"]


async def test_offline_detection_follows_the_injected_clock_and_survives_a_restart(
    settings: Settings,
    pg: asyncpg.Connection,
    stores: Stores,
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
    harness = Harness(stores, clock)
    try:
        await harness.send(device_id, user_id, T0, 20.0)
        checks = OfflineChecks(harness.actor)
        clock.now = T0 + timedelta(seconds=599)
        await checks.wait(10)
        assert checks.fired() == [] and await pg.fetchval(ALERTS) == 0
        clock.now = T0 + timedelta(seconds=600)
        await wait_for_count(pg, ALERTS, 1)
    finally:
        await harness.stop()
    doc = orjson.loads(await pg.fetchval("SELECT doc FROM documents WHERE collection = 'alerts'"))
    assert (doc["alert_type"], doc["status"], doc["user_id"]) == ("offline", "active", user_id)
    assert datetime.fromisoformat(doc["fired_at"]) == T0 + timedelta(seconds=600)
    try:
        message = await next_message(pubsub)
    finally:
        await pubsub.aclose()
    assert message is not None and orjson.loads(message["data"])["event"] == "alert.fired"

    clock.now = T0 + timedelta(hours=5)  # restarted much later: still the same single alert
    harness = Harness(stores, clock)
    try:
        checks = await OfflineChecks.of(harness.actor)
        await checks.wait(10)
        assert checks.fired() == [] and await pg.fetchval(ALERTS) == 1
        out = await harness.send(device_id, user_id, clock.now, 21.0)
        assert [e.kind for e in out.alerts] == ["resolved"]
        await harness.sink.write(out)
    finally:
        await harness.stop()
    status = await pg.fetchval("SELECT doc->>'status' FROM documents WHERE collection = 'alerts'")
    assert status == "resolved"


async def test_a_withdrawal_stored_before_its_alert_still_resolves_it(
    settings: Settings, pg: asyncpg.Connection, stores: Stores, admin: RuleAdmin, device: tuple[int, int]
) -> None:
    device_id, user_id = device
    scope = Scope("device", device_id)
    await admin.set_rule(
        scope, {"id": "hot", "type": "threshold", "field": "temperature", "condition": ">", "value": 30}
    )
    harness = Harness(stores, Clock(T0))
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
    settings: Settings, pg: asyncpg.Connection, stores: Stores, admin: RuleAdmin, device: tuple[int, int]
) -> None:
    device_id, user_id = device
    await admin.set_rule(
        Scope("device", device_id),
        {"id": "hot", "type": "threshold", "field": "temperature", "condition": ">", "value": 30},
    )
    harness = Harness(stores, Clock(T0))
    try:
        batch = await harness.send(device_id, user_id, T0, 35.0)
    finally:
        await harness.stop()
    recent = f"{settings.redis.key_prefix}alerts:{device_id}"
    client = aioredis.Redis.from_url(settings.redis.url)
    sink = AlertSink(stores)
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


class CrashingSink(AlertSink):
    """The writer's sink dying after the documents are stored, before Redis hears of them."""

    async def _announce(self, events: Sequence[AlertEvent]) -> None:
        raise RuntimeError("crash before the announcement")


async def test_an_alert_stored_but_not_announced_before_a_crash_is_announced_after_the_restart(
    settings: Settings, pg: asyncpg.Connection, stores: Stores, admin: RuleAdmin, device: tuple[int, int]
) -> None:
    device_id, user_id = device
    await admin.set_rule(
        Scope("device", device_id),
        {"id": "hot", "type": "threshold", "field": "temperature", "condition": ">", "value": 30},
    )
    recent = f"{settings.redis.key_prefix}alerts:{device_id}"
    client = aioredis.Redis.from_url(settings.redis.url)
    try:
        for value, at, announced in (
            (35.0, T0, ["alert.fired"]),
            (25.0, T0 + timedelta(seconds=1), ["alert.resolved", "alert.fired"]),
        ):
            before = len(announced) - 1
            harness = Harness(stores, Clock(T0))  # a new process each time
            try:
                await wait_for(partial(_llen_is, client, recent, before))
                crashing = CrashingSink(stores)
                try:
                    with pytest.raises(RuntimeError):
                        await crashing.write(await harness.send(device_id, user_id, at, value))
                finally:
                    await crashing.close()
            finally:
                await harness.stop()
            assert await client.llen(recent) == before
            harness = Harness(stores, Clock(T0))  # restarted; the broker redelivers the reading
            try:
                await wait_for(partial(_llen_is, client, recent, before + 1))
                redelivered = await harness.send(device_id, user_id, at, value)
                assert redelivered.alerts == []  # already judged: only the start could announce it
                await harness.sink.write(redelivered)
            finally:
                await harness.stop()
            items = [orjson.loads(item)["event"] for item in await client.lrange(recent, 0, -1)]
            assert items == announced
        unnotified = await pg.fetchval(
            "SELECT count(*) FROM documents WHERE collection = 'event_logs' AND doc->>'notified' = 'false'"
        )
        assert unnotified == 0
        status = await pg.fetchval("SELECT doc->>'status' FROM documents WHERE collection = 'alerts'")
        assert status == "resolved"
    finally:
        await client.aclose()


async def test_a_store_outage_longer_than_an_offline_rule_raises_no_offline_alert(
    settings: Settings, pg: asyncpg.Connection, stores: Stores, admin: RuleAdmin, device: tuple[int, int]
) -> None:
    device_id, user_id = device
    settings.rules = replace(settings.rules, offline_check_s=0.02)
    await admin.set_rule(Scope("device", device_id), {"id": "silent", "type": "offline", "duration": "10m"})
    clock = Clock(T0)
    harness = Harness(stores, clock)
    try:
        await harness.send(device_id, user_id, T0, 20.0)
        evaluator = harness.actor.evaluator
        assert evaluator is not None
        held: list[datetime] = []
        hold = evaluator.hold_offline

        def held_once(now: datetime) -> None:
            held.append(now)
            harness.actor.stall_s = 3600  # this stall only: a lagging loop later is no outage
            hold(now)

        evaluator.hold_offline = held_once  # type: ignore[method-assign]
        for _ in range(harness.outbox.maxsize):  # the writer stops taking batches: the store is away
            await harness.outbox.put(DecodedBatch())
        reading = DecodedBatch(
            readings=[Reading(T0 + timedelta(seconds=1), device_id, 1, 21.0, "temperature")],
            device_users={device_id: user_id},
        )
        await harness.inbox.put(reading)
        # Taken from the inbox means judged, and waiting on the full mailbox: no ticks meanwhile.
        await wait_for(lambda: _true(harness.inbox.empty()))
        clock.now = T0 + timedelta(minutes=20)  # the outage outlasts the rule's duration
        harness.actor.stall_s = 0.3
        await asyncio.sleep(0.6)  # and the actor's real wait outlasts stall_s
        drained: list[DecodedBatch] = []
        while reading not in drained:  # the store is back: the writer catches up
            drained += await harness.outbox.get_batch(64, 1)
        checks = OfflineChecks(harness.actor)
        await checks.wait(10)
        assert held == [T0 + timedelta(minutes=20)]
        assert checks.fired() == [] and await pg.fetchval(ALERTS) == 0
        clock.now = T0 + timedelta(minutes=30, seconds=1)  # silence counted from the end of the stall
        await wait_for_count(pg, ALERTS, 1)
    finally:
        await harness.stop()


class PausingStore:
    """The real PostgreSQL document store, pausing after its first update of an `alerts` document."""

    def __init__(self, inner: PostgresDocumentStore) -> None:
        self._inner = inner
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def update(self, collection: str, key: str, changes: dict[str, Any]) -> bool:
        updated = await self._inner.update(collection, key, changes)
        if collection == "alerts" and not self.paused.is_set():
            self.paused.set()
            await self.resume.wait()
        return updated


async def test_a_withdrawal_racing_the_insert_of_its_alert_still_resolves_it(
    settings: Settings, pg: asyncpg.Connection, stores: Stores
) -> None:
    hot = parse_rule(
        {"id": "hot", "type": "threshold", "field": "temperature", "condition": ">", "value": 30},
        Scope("device", 5),
    )
    evaluator = Evaluator(RuleSet([hot]), Clock(T0))
    (fired,) = evaluator.evaluate([Reading(T0, 5, 1, 35.0, "temperature")], {5: None})
    (withdrawn,) = evaluator.replace_rules(RuleSet([]))
    store = PausingStore(PostgresDocumentStore(stores.postgres))
    actor_sink, writer_sink = AlertSink(stores), AlertSink(stores)
    actor_sink._docs = store  # type: ignore[assignment]
    try:
        async with background(actor_sink.write_events([withdrawn])) as withdrawing:
            await asyncio.wait_for(store.paused.wait(), 20)  # the actor's update of the alert ran
            await writer_sink.write_events([fired])  # the writer stores the alert meanwhile
            store.resume.set()
            await withdrawing
    finally:
        await actor_sink.close()
        await writer_sink.close()
    doc = orjson.loads(await pg.fetchval("SELECT doc FROM documents WHERE collection = 'alerts'"))
    assert doc["status"] == "resolved" and doc["resolution"]["reason"] == "rule_withdrawn"


async def test_announcements_survive_an_unexpected_listener_error(
    settings: Settings, stores: Stores, admin: RuleAdmin, device: tuple[int, int]
) -> None:
    device_id, user_id = device
    settings.rules = replace(settings.rules, refresh_s=3600)  # only an announcement reloads
    harness = Harness(stores, Clock(T0))
    real_pubsub = stores.redis.pubsub
    calls = 0

    def pubsub() -> Any:
        nonlocal calls
        calls += 1
        made = real_pubsub()
        if calls == 1:

            async def subscribe(*_: Any) -> None:
                raise ValueError("unexpected")  # not a connection error

            made.subscribe = subscribe
        return made

    stores.redis.pubsub = pubsub  # type: ignore[method-assign]
    client = aioredis.Redis.from_url(settings.redis.url)
    channel = rules_channel(RedisKeys(settings.redis.key_prefix))
    try:
        assert (await harness.send(device_id, user_id, T0, 35.0)).alerts == []
        await wait_for(lambda: _subscribed(client, channel))
        await admin.set_rule(
            Scope("device", device_id),
            {"id": "hot", "type": "threshold", "field": "temperature", "condition": ">", "value": 30},
        )
        await wait_for(lambda: _has_rules(harness.actor))
        out = await harness.send(device_id, user_id, T0 + timedelta(seconds=1), 36.0)
        assert [e.kind for e in out.alerts] == ["fired"]
    finally:
        await harness.stop()
        await client.aclose()


async def _subscribed(client: aioredis.Redis, channel: str) -> bool:
    ((_, count),) = await client.pubsub_numsub(channel)
    return bool(count)


async def _has_rules(actor: RulesActor) -> bool:
    return actor.evaluator is not None and len(actor.evaluator.rules) > 0


async def test_a_store_away_at_start_is_waited_for_and_what_came_meanwhile_is_judged(
    settings: Settings, admin: RuleAdmin, device: tuple[int, int]
) -> None:
    device_id, user_id = device
    hot = {"id": "hot", "type": "threshold", "field": "temperature", "condition": ">", "value": 30}
    await admin.set_rule(Scope("device", device_id), hot)
    proxy, url = await proxied(settings.postgres.url)
    try:
        async with open_stores(replace(settings, postgres=replace(settings.postgres, url=url))) as stores:
            proxy.cut()
            with capture_logs() as logs:
                harness = Harness(stores, Clock(T0))
                try:
                    batch = DecodedBatch(
                        readings=[Reading(T0, device_id, 1, 35.0, "temperature")],
                        messages=1,
                        device_users={device_id: user_id},
                    )
                    await harness.inbox.put(batch)
                    await wait_for(lambda: _true(any(e["event"] == "rules.load.unavailable" for e in logs)))
                    assert not harness.actor.loaded.is_set() and harness.inbox.qsize() == 1
                    await proxy.restore()
                    (out,) = await harness.outbox.get_batch(1, 30)
                    assert harness.actor.loaded.is_set()
                    assert [(e.kind, e.rule_id) for e in out.alerts] == [("fired", f"device:{device_id}/hot")]
                finally:
                    await harness.stop()
    finally:
        await proxy.stop()
