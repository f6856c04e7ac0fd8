"""Alert notifications end to end: a real Alertmanager, a real webhook receiver, the outbox.

Each test has devices of its own and counts only their notifications. Retries are
shortened through the settings; every wait is for a condition, never for a duration.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import replace
from functools import partial
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from worker.config import NotifySettings, Settings, WebhookSettings
from worker.rules.admin import RuleAdmin
from worker.rules.model import Scope
from worker.tools.bench.support import parse_metrics
from worker.tools.servers import AlertmanagerServer

from .helpers import Cli, publish, running_daemon, wait_for, wait_for_committed, worker_process
from .test_rules_pipeline import HOT, Device
from .webhook_receiver import WebhookReceiver

SECRET = "test-secret-0123456789"
# Retries within a test's patience: a receiver back up is noticed within a second.
QUICK = NotifySettings(poll_s=0.1, retry_first_s=0.1, retry_max_s=0.5, timeout_s=5)


async def new_device(pg: asyncpg.Connection, admin: RuleAdmin) -> Device:
    """A device of the demo user with the HOT rule."""
    key = f"notify-test-{uuid.uuid4().hex[:12]}"
    user_id = await pg.fetchval("SELECT id FROM users WHERE username = 'demo'")
    device_id = await pg.fetchval(
        "INSERT INTO devices (device_key, user_id, name) VALUES ($1, $2, $1) RETURNING id", key, user_id
    )
    await pg.execute(
        "INSERT INTO datapoints (device_id, label, unit) VALUES ($1, 'temperature', '°C')", device_id
    )
    await admin.set_rule(Scope("device", device_id), HOT)
    return Device(device_id, user_id, key)


def with_webhook(settings: Settings, receiver: WebhookReceiver, **quick: Any) -> Settings:
    hook = WebhookSettings(url=receiver.url, name="test", secret=SECRET)
    return replace(settings, notify=replace(QUICK, webhooks=[hook], **quick))


async def outbox(pg: asyncpg.Connection) -> list[asyncpg.Record]:
    return await pg.fetch("SELECT * FROM notification_outbox ORDER BY id")


async def test_a_webhook_gets_fired_acknowledged_and_resolved_signed(
    settings: Settings,
    pg: asyncpg.Connection,
    admin: RuleAdmin,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    device = await new_device(pg, admin)
    with WebhookReceiver() as receiver:
        hooks = [{"url": receiver.url, "name": "test", "secret": SECRET}]
        monkeypatch.setenv("IOTFLOW_NOTIFY_WEBHOOKS", orjson.dumps(hooks).decode())
        async with running_daemon(with_webhook(settings, receiver)):
            await publish(settings.mqtt.url, device.telemetry([25, 31]))

            async def received(count: int) -> bool:
                return len(receiver.received) >= count

            await wait_for(partial(received, 1))
            alert = receiver.received[0].body["alert_id"]
            code, _, err = await Cli(settings, monkeypatch, capsys)("alerts", "ack", alert, "--by", "alice")
            assert code == 0, err
            await wait_for(partial(received, 2))
            await publish(settings.mqtt.url, device.telemetry([20], start=time.time()))
            await wait_for(partial(received, 3))
    fired, acknowledged, resolved = receiver.received
    events = [note.body["event"] for note in receiver.received]
    assert events == ["alert.fired", "alert.acknowledged", "alert.resolved"]
    assert acknowledged.body["details"] == {"by": "alice"}
    for note in (fired, acknowledged, resolved):
        assert note.signed_by(SECRET)
        assert not note.signed_by("another secret")
        assert abs(int(note.headers["x-iotflow-timestamp"]) - time.time()) < 300  # the replay window
        assert note.headers["x-iotflow-event-key"] == note.body["event_key"]
        assert note.body["device_id"] == device.id and note.body["rule_id"] == f"device:{device.id}/hot"
    assert fired.body["alert_id"] == resolved.body["alert_id"]
    assert fired.body["event_key"] == f"{fired.body['alert_id']}:fired"
    assert fired.body["details"]["value"] == 31.0 and fired.body["details"]["threshold"] == 30.0
    assert fired.body["status"] == "active" and resolved.body["status"] == "resolved"


async def alertmanager_alerts(server: AlertmanagerServer, device: Device) -> list[dict[str, Any]]:
    """The alerts Alertmanager holds for the device and does not count as resolved. Found by
    its key: device ids repeat from one test's schema to the next, and the suite's Alertmanager
    may still hold another test's alerts (the notify bench's storm) for the same id."""
    async with (
        aiohttp.ClientSession(raise_for_status=True) as client,
        client.get(f"{server.url}/api/v2/alerts", params={"filter": f'device="{device.key}"'}) as answer,
    ):
        alerts: list[dict[str, Any]] = await answer.json()
    return alerts


async def test_alertmanager_shows_the_breach_with_its_labels_keeps_it_firing_and_the_clear_resolves_it(
    settings: Settings, pg: asyncpg.Connection, admin: RuleAdmin, alertmanager_server: AlertmanagerServer
) -> None:
    device = await new_device(pg, admin)
    user_id = await pg.fetchval("SELECT user_id FROM devices WHERE id = $1", device.id)
    for name in ("cold-room", "site-a"):
        group = await pg.fetchval(
            "INSERT INTO device_groups (user_id, name) VALUES ($1, $2) RETURNING id", user_id, name
        )
        await pg.execute("INSERT INTO device_group_members VALUES ($1, $2)", group, device.id)
    # Refreshed every half second: valid for two, so only the refreshes keep it firing.
    notify = replace(QUICK, alertmanager_urls=[alertmanager_server.url], refresh_s=0.5)
    async with running_daemon(replace(settings, notify=notify)):
        await publish(settings.mqtt.url, device.telemetry([25, 31]))

        async def firing() -> bool:
            return len(await alertmanager_alerts(alertmanager_server, device)) == 1

        await wait_for(firing)
        (alert,) = await alertmanager_alerts(alertmanager_server, device)
        assert alert["status"]["state"] == "active"
        assert alert["labels"] == {
            "alertname": f"device:{device.id}/hot",
            "alert_type": "threshold",
            "severity": "warning",
            "device_id": str(device.id),
            "device": device.key,
            "measurement": "temperature",
            "user": "demo",
            "groups": "cold-room,site-a",
            "source": "iotflow",
        }
        assert alert["annotations"]["value"] == "31.0" and alert["annotations"]["threshold"] == "30.0"
        assert "above the threshold" in alert["annotations"]["message"]

        async def refreshed() -> bool:
            (again,) = await alertmanager_alerts(alertmanager_server, device)
            return bool(again["endsAt"] > alert["endsAt"] and again["startsAt"] == alert["startsAt"])

        await wait_for(refreshed)

        await publish(settings.mqtt.url, device.telemetry([20], start=time.time()))

        async def resolved() -> bool:
            return not await alertmanager_alerts(alertmanager_server, device)

        await wait_for(resolved)


async def test_a_receiver_down_then_up_gets_every_notification_once_and_ingest_goes_on(
    settings: Settings,
    pg: asyncpg.Connection,
    admin: RuleAdmin,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    devices = [await new_device(pg, admin) for _ in range(3)]
    receiver = WebhookReceiver()  # not started: the port refuses connections
    try:
        async with running_daemon(with_webhook(settings, receiver)) as daemon:
            for device in devices:
                await publish(settings.mqtt.url, device.telemetry([31, 20]))

            async def all_failing() -> bool:
                rows = await outbox(pg)
                return len(rows) == 6 and all(r["attempts"] >= 2 and r["last_error"] for r in rows)

            await wait_for(all_failing)
            scraped = parse_metrics(daemon.metrics.render_prometheus().decode())
            assert scraped['iotflow_notification_channel_failing{channel="webhook test"}'] == 1
            assert scraped["iotflow_notifications_pending"] == 6
            assert scraped['iotflow_notifications_failed_total{channel="webhook"}'] >= 12
            # Ingest is not held: readings keep being committed while the receiver is down.
            committed = daemon.metrics.counters["messages_committed"]
            for device in devices:
                await publish(settings.mqtt.url, device.telemetry([25] * 5, start=time.time()))
            await wait_for_committed(daemon, committed + 15)
            assert not receiver.received

            code, out, _ = await Cli(settings, monkeypatch, capsys)("alerts", "list")
            assert code == 0
            assert out.count("notify webhook test fired: failing:") == 3, out

            receiver.start()

            async def all_delivered() -> bool:
                return not await outbox(pg)

            await wait_for(all_delivered)
            assert daemon.metrics.labeled_gauges["notification_channel_failing"][("webhook test",)]() == 0
    finally:
        receiver.stop()
    keys = Counter(body["event_key"] for body in receiver.bodies())
    assert len(keys) == 6 and set(keys.values()) == {1}, keys
    assert {body["device_id"] for body in receiver.bodies()} == {d.id for d in devices}


async def test_a_notification_stored_but_not_sent_when_killed_is_sent_after_the_restart(
    settings: Settings, pg: asyncpg.Connection, admin: RuleAdmin
) -> None:
    device = await new_device(pg, admin)
    receiver = WebhookReceiver()  # down: delivery cannot happen before the kill
    webhooks = orjson.dumps([{"url": receiver.url, "name": "test", "secret": SECRET}]).decode()
    env = {
        "IOTFLOW_NOTIFY_WEBHOOKS": webhooks,
        "IOTFLOW_NOTIFY_POLL_S": "0.1",
        "IOTFLOW_NOTIFY_RETRY_FIRST_S": "0.1",
        "IOTFLOW_NOTIFY_RETRY_MAX_S": "0.5",
        "IOTFLOW_NOTIFY_TIMEOUT_S": "1",  # a short lease: rows a killed worker claimed come back soon
    }
    try:
        async with worker_process(settings, **env) as worker:
            await worker.wait_for_event("supervisor.ready")
            await publish(settings.mqtt.url, device.telemetry([25, 31]))

            async def tried() -> bool:
                rows = await outbox(pg)
                return len(rows) == 1 and rows[0]["attempts"] >= 1

            await wait_for(tried)
            await worker.kill()  # SIGKILL: stored, never delivered
        receiver.start()
        async with worker_process(settings, **env) as worker:

            async def delivered() -> bool:
                return bool(receiver.received)

            await wait_for(delivered, timeout=60)
            assert await worker.terminate() == 0
    finally:
        receiver.stop()
    (note,) = receiver.received
    assert note.body["event"] == "alert.fired" and note.body["device_id"] == device.id
    assert note.signed_by(SECRET)


async def test_alerts_test_reports_each_channel_and_fails_when_one_does_not_take_it(
    settings: Settings,
    alertmanager_server: AlertmanagerServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    down = WebhookReceiver()
    with WebhookReceiver() as up:
        hooks = [{"url": up.url, "name": "up", "secret": SECRET}]
        monkeypatch.setenv("IOTFLOW_NOTIFY_ALERTMANAGER_URLS", alertmanager_server.url)
        monkeypatch.setenv("IOTFLOW_NOTIFY_WEBHOOKS", orjson.dumps(hooks).decode())
        cli = Cli(settings, monkeypatch, capsys)
        code, out, _ = await cli("alerts", "test")
        assert code == 0, out
        assert out.splitlines() == [f"alertmanager {alertmanager_server.url}: ok", "webhook up: ok"]
        (note,) = up.received
        assert note.body["event"] == "test" and note.signed_by(SECRET)

        hooks.append({"url": down.url, "name": "down", "secret": SECRET})
        monkeypatch.setenv("IOTFLOW_NOTIFY_WEBHOOKS", orjson.dumps(hooks).decode())
        code, out, _ = await cli("alerts", "test")
        assert code == 1
        assert out.splitlines()[-1].startswith("webhook down: failed: ClientConnectorError: Cannot connect")

    monkeypatch.delenv("IOTFLOW_NOTIFY_ALERTMANAGER_URLS")
    monkeypatch.delenv("IOTFLOW_NOTIFY_WEBHOOKS")
    code, _, err = await cli("alerts", "test")
    assert code == 2 and "no notification channel configured" in err
