"""Rules in the running daemon: MQTT in, alerts in the document store, Redis and pub/sub out.

Each test publishes for a device of its own, and counts only that device's rows:
a shared broker may carry other publishers' simulated fleets at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from worker.config import Settings
from worker.pipeline import Daemon
from worker.rules.admin import RuleAdmin
from worker.rules.events import compact_time
from worker.rules.model import Scope

from .helpers import publish, running_daemon, schema_documents, wait_for, wait_for_committed, wait_for_count

HOT = {"id": "hot", "type": "threshold", "field": "temperature", "condition": ">", "value": 30, "unit": "°C"}


@dataclass(frozen=True)
class Device:
    id: int
    user_id: int
    key: str

    @property
    def scope(self) -> Scope:
        return Scope("device", self.id)

    @property
    def alerts_query(self) -> str:
        return (
            f"SELECT count(*) FROM documents WHERE collection = 'alerts' AND doc->>'device_id' = '{self.id}'"
        )

    @property
    def resolved_query(self) -> str:
        return self.alerts_query + " AND doc->>'status' = 'resolved'"

    @property
    def readings_query(self) -> str:
        return f"SELECT count(*) FROM decoded_data WHERE device_id = {self.id}"

    def telemetry(self, values: list[float], start: float | None = None) -> list[tuple[str, bytes]]:
        """One message per value, a second apart, ending about now unless `start` says otherwise."""
        first = (start if start is not None else time.time() - len(values)) * 1000
        return [
            (
                f"devices/{self.key}/telemetry",
                orjson.dumps({"ts": int(first + i * 1000), "values": {"temperature": v}}),
            )
            for i, v in enumerate(values)
        ]


@pytest.fixture
async def device(pg: asyncpg.Connection) -> Device:
    key = f"rules-test-{uuid.uuid4().hex[:12]}"
    user_id = await pg.fetchval("SELECT id FROM users WHERE username = 'demo'")
    device_id = await pg.fetchval(
        "INSERT INTO devices (device_key, user_id, name) VALUES ($1, $2, $1) RETURNING id", key, user_id
    )
    await pg.execute(
        "INSERT INTO datapoints (device_id, label, unit) VALUES ($1, 'temperature', '°C')", device_id
    )
    return Device(device_id, user_id, key)


async def alerts(pg: asyncpg.Connection, device: Device) -> list[dict[str, Any]]:
    rows = await pg.fetch(
        "SELECT key, doc FROM documents WHERE collection = 'alerts' AND doc->>'device_id' = $1 "
        "ORDER BY doc->>'fired_at'",
        str(device.id),
    )
    return [{"_id": r["key"], **orjson.loads(r["doc"])} for r in rows]


async def event_types(pg: asyncpg.Connection, device: Device) -> list[str]:
    rows = await pg.fetch(
        "SELECT doc->>'event_type' AS t FROM documents WHERE collection = 'event_logs' "
        "AND doc->>'device_id' = $1 ORDER BY doc->>'timestamp', key",
        str(device.id),
    )
    return [r["t"] for r in rows]


async def redis_list(settings: Settings, key: str) -> tuple[list[bytes], int]:
    """The list's items and its TTL."""
    client = aioredis.Redis.from_url(settings.redis.url)
    try:
        return await client.lrange(key, 0, -1), await client.ttl(key)
    finally:
        await client.aclose()


async def collect(pubsub: aioredis.client.PubSub, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message:
            received.append({"channel": message["channel"].decode(), **orjson.loads(message["data"])})
    return received


def rules_loaded(daemon: Daemon, count: int) -> Any:
    async def probe() -> bool:
        return bool(daemon.metrics.gauges["rules_loaded"]() == count)

    return probe


async def test_threshold_alert_fires_resolves_and_notifies(
    settings: Settings, pg: asyncpg.Connection, admin: RuleAdmin, device: Device
) -> None:
    await admin.set_rule(device.scope, HOT)
    prefix = settings.redis.key_prefix
    client = aioredis.Redis.from_url(settings.redis.url)
    pubsub = client.pubsub()
    await pubsub.subscribe(
        f"{prefix}channel:system:alerts", f"{prefix}channel:user:{device.user_id}:notifications"
    )
    try:
        async with running_daemon(settings):
            await publish(settings.mqtt.url, device.telemetry([25, 31, 35, 33, 20]))
            await wait_for_count(pg, device.resolved_query, 1)
            notes = [n for n in await collect(pubsub, 4) if n["device_id"] == device.id]
    finally:
        await pubsub.aclose()
        await client.aclose()

    (alert,) = await alerts(pg, device)
    assert alert["_id"].startswith(f"device:{device.id}/hot:{device.id}:")
    assert alert["status"] == "resolved" and alert["acknowledged"] is False
    assert (alert["severity"], alert["alert_type"], alert["user_id"]) == (
        "warning",
        "threshold",
        device.user_id,
    )
    assert alert["message"] == f"temperature on device {device.id} is 31 °C, above the threshold of 30 °C"
    assert alert["details"] == {"measurement": "temperature", "value": 31.0, "threshold": 30.0, "unit": "°C"}
    assert alert["resolution"]["value"] == 20.0 and alert["resolved_at"] > alert["fired_at"]
    assert await event_types(pg, device) == ["alert.fired", "alert.resolved"]

    by_channel = sorted((n["channel"].rsplit(":", 2)[-2], n["event"]) for n in notes)
    assert by_channel == sorted(
        [
            (who, event)
            for who in ("system", str(device.user_id))
            for event in ("alert.fired", "alert.resolved")
        ]
    )
    items, ttl = await redis_list(settings, f"{prefix}alerts:{device.id}")
    assert [orjson.loads(item)["event"] for item in items] == ["alert.resolved", "alert.fired"]
    assert 0 < ttl <= 86400


async def test_redelivery_and_restarts_raise_no_duplicate_alerts(
    settings: Settings, pg: asyncpg.Connection, admin: RuleAdmin, device: Device
) -> None:
    await admin.set_rule(device.scope, {**HOT, "for_count": 2})
    start = time.time() - 30
    breach = device.telemetry([31, 32, 33], start=start)
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, breach)
        await wait_for_count(pg, device.alerts_query, 1)
        await publish(settings.mqtt.url, breach)  # the same messages again, as after a crash
        await wait_for_committed(daemon, 2 * len(breach))  # judged again, too
        assert await pg.fetchval(device.readings_query) == 3
    async with running_daemon(settings):
        # After a restart the breach goes on: without the stored active alert, these two
        # samples would satisfy the debounce again and fire a second alert.
        await publish(settings.mqtt.url, device.telemetry([34, 35], start=start + 3))
        await wait_for_count(pg, device.readings_query, 5)
        await publish(settings.mqtt.url, device.telemetry([20], start=start + 5))
        await wait_for_count(pg, device.resolved_query, 1)
    async with running_daemon(settings):
        # Readings from before the resolution, redelivered: already judged, they fire nothing.
        await publish(settings.mqtt.url, device.telemetry([33, 34], start=start + 2))
        # Then a new breach, which does fire: evaluation goes on.
        await publish(settings.mqtt.url, device.telemetry([40, 41], start=start + 10))
        await wait_for_count(pg, device.alerts_query, 2)
    first, second = await alerts(pg, device)
    assert first["status"] == "resolved" and second["status"] == "active"
    assert second["_id"].endswith(compact_time(datetime.fromtimestamp(int((start + 11) * 1000) / 1000, UTC)))
    assert await event_types(pg, device) == ["alert.fired", "alert.resolved", "alert.fired"]
    items, _ = await redis_list(settings, f"{settings.redis.key_prefix}alerts:{device.id}")
    assert len(items) == 3


async def test_rule_changes_apply_at_once_without_a_restart(
    settings: Settings, pg: asyncpg.Connection, admin: RuleAdmin, device: Device
) -> None:
    settings.rules = replace(settings.rules, refresh_s=3600)  # only the announcement can explain a reload
    start = time.time() - 30
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, device.telemetry([35], start=start))
        await wait_for_count(pg, device.readings_query, 1)
        assert await pg.fetchval(device.alerts_query) == 0

        await admin.set_rule(device.scope, HOT)
        await wait_for(rules_loaded(daemon, 1))  # the periodic refresh would take an hour
        await publish(settings.mqtt.url, device.telemetry([36], start=start + 1))
        await wait_for_count(pg, device.alerts_query, 1)

        assert await admin.delete_rule(device.scope, "hot")
        await wait_for_count(pg, device.resolved_query, 1)  # withdrawn with its rule, no reading needed
    (alert,) = await alerts(pg, device)
    assert alert["resolution"]["reason"] == "rule_withdrawn"


async def test_edits_behind_the_cli_apply_within_the_refresh_period(
    settings: Settings, pg: asyncpg.Connection, device: Device
) -> None:
    settings.rules = replace(settings.rules, refresh_s=0.3)
    async with schema_documents(settings) as documents, running_daemon(settings) as daemon:
        # Written straight into the store: no announcement on Redis.
        await documents.upsert(
            "device_configs", device.scope.key, {"device_id": device.id, "settings": {"alerts": [HOT]}}
        )
        await wait_for(rules_loaded(daemon, 1))  # never, were there no periodic refresh
        await publish(settings.mqtt.url, device.telemetry([40]))
        await wait_for_count(pg, device.alerts_query, 1)


async def test_a_malformed_rule_is_reported_and_the_others_still_fire(
    settings: Settings, pg: asyncpg.Connection, device: Device
) -> None:
    bad = {"type": "threshold", "field": "temperature", "condition": "=>", "value": 30}
    await pg.execute(
        "INSERT INTO documents (collection, key, doc) VALUES ('device_configs', $1, $2::jsonb)",
        device.scope.key,
        orjson.dumps({"device_id": device.id, "settings": {"alerts": [bad, HOT]}}).decode(),
    )
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, device.telemetry([45]))
        await wait_for_count(pg, device.alerts_query, 1)
        assert daemon.metrics.gauges["rules_invalid"]() == 1
        assert daemon.metrics.gauges["rules_loaded"]() == 1


async def test_offline_alert_fires_after_silence_survives_a_restart_and_resolves_on_data(
    settings: Settings, pg: asyncpg.Connection, admin: RuleAdmin, device: Device
) -> None:
    settings.rules = replace(settings.rules, offline_check_s=0.1)
    await admin.set_rule(device.scope, {"id": "silent", "type": "offline", "duration": 1})
    async with running_daemon(settings):
        await publish(settings.mqtt.url, device.telemetry([20], start=time.time()))
        await wait_for_count(pg, device.readings_query, 1)
        await wait_for_count(pg, device.alerts_query, 1)
    (alert,) = await alerts(pg, device)
    assert alert["alert_type"] == "offline" and alert["status"] == "active"
    assert alert["message"].startswith(f"device {device.id} has sent no data for 1 s")
    async with running_daemon(settings):
        await asyncio.sleep(1.5)  # longer than the rule's duration: a new alert would have fired
        assert await pg.fetchval(device.alerts_query) == 1
        await publish(settings.mqtt.url, device.telemetry([21], start=time.time()))
        await wait_for_count(pg, device.resolved_query, 1)
        # Checked before stopping: a second of silence after this reading is a new, legitimate alert.
        assert (await event_types(pg, device))[:2] == ["alert.fired", "alert.resolved"]
    assert (await alerts(pg, device))[0]["_id"] == alert["_id"]


async def test_group_and_global_rules_reach_their_devices(
    settings: Settings, pg: asyncpg.Connection, admin: RuleAdmin, device: Device
) -> None:
    group_id = await pg.fetchval(
        "INSERT INTO device_groups (user_id, name) VALUES ($1, 'greenhouse') RETURNING id", device.user_id
    )
    await pg.execute(
        "INSERT INTO device_group_members (group_id, device_id) VALUES ($1, $2)", group_id, device.id
    )
    await admin.set_rule(Scope("group", group_id), {**HOT, "id": "group-hot", "value": 40})
    # Far above anything a simulated fleet on a shared broker reports.
    await admin.set_rule(Scope("global"), {**HOT, "id": "fleet-hot", "value": 500, "severity": "critical"})
    async with running_daemon(settings):
        await publish(settings.mqtt.url, device.telemetry([45, 555]))
        await wait_for_count(pg, device.alerts_query, 2)
    found = {a["rule_id"]: a["severity"] for a in await alerts(pg, device)}
    assert found == {f"group:{group_id}/group-hot": "warning", "global/fleet-hot": "critical"}


@contextlib.asynccontextmanager
async def rules_load_held(pg: asyncpg.Connection) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Hold the rules' load: the config documents locked until the yielded release is awaited."""
    lock = pg.transaction()
    await lock.start()
    await pg.execute("LOCK TABLE documents IN ACCESS EXCLUSIVE MODE")
    released = False

    async def release() -> None:
        nonlocal released
        if not released:
            released = True
            await lock.rollback()

    try:
        yield release
    finally:
        await release()


def judging(daemon: Daemon, waiting: int) -> Callable[[], Awaitable[bool]]:
    """Subscribed, and `waiting` decoded batches in the rules actor's mailbox."""

    async def probe() -> bool:
        pipeline = daemon.pipeline
        return (
            pipeline is not None
            and pipeline.intake.subscribed.is_set()
            and pipeline.rules is not None
            and pipeline.rules.mailbox.qsize() >= waiting
        )

    return probe


async def test_ready_waits_for_the_rules_and_what_came_before_is_judged_by_them(
    settings: Settings, pg: asyncpg.Connection, admin: RuleAdmin, device: Device
) -> None:
    await admin.set_rule(device.scope, HOT)
    daemon = Daemon(settings)
    async with rules_load_held(pg) as release:
        task = asyncio.create_task(daemon.run(handle_signals=False))
        try:
            await wait_for(judging(daemon, 0))  # subscribed: what is published now reaches us
            await publish(settings.mqtt.url, device.telemetry([35]))
            await wait_for(judging(daemon, 1))  # decoded, and waiting for the rules
            assert daemon.pipeline is not None and not daemon.ready.is_set()
            assert (await daemon.pipeline.readiness())["rules"] is False
            await release()
            await asyncio.wait_for(daemon.ready.wait(), 20)
            assert (await daemon.pipeline.readiness())["rules"] is True
            await wait_for_count(pg, device.alerts_query, 1)
        finally:
            await release()  # first: a stop waits for the load
            daemon.request_stop()
            assert await asyncio.wait_for(task, 30) == 0
    (alert,) = await alerts(pg, device)
    assert alert["rule_id"] == f"device:{device.id}/hot" and alert["details"]["value"] == 35.0


async def test_a_stop_during_the_rules_load_lets_it_finish_and_drains_what_waited(
    settings: Settings, pg: asyncpg.Connection, admin: RuleAdmin, device: Device
) -> None:
    await admin.set_rule(device.scope, HOT)
    daemon = Daemon(settings)
    async with rules_load_held(pg) as release:
        task = asyncio.create_task(daemon.run(handle_signals=False))
        try:
            await wait_for(judging(daemon, 0))
            await publish(settings.mqtt.url, device.telemetry([35]))
            await wait_for(judging(daemon, 1))
            daemon.request_stop()
            rules = daemon.pipeline.rules if daemon.pipeline is not None else None
            assert rules is not None

            async def stopping() -> bool:  # upstream stopped, the stop now waits on the load
                return rules.stopping

            await wait_for(stopping)
            await release()
            code = await asyncio.wait_for(task, 30)
        finally:
            await release()
            task.cancel()
    assert code == 0 and not daemon.ready.is_set()
    assert daemon.metrics.counters["messages_committed"] == 1
    assert await pg.fetchval(device.readings_query) == 1
    assert await pg.fetchval(device.alerts_query) == 1
