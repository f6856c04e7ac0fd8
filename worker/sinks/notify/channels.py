"""How each receiver is spoken to: Alertmanager's API v2 and signed JSON webhooks.

A channel sends a list of outbox rows and says how many were delivered (it starts no
request past the round's deadline, which keeps the round's transaction short); a failure
(a refused connection, a timeout, a status other than 2xx) raises `DeliveryFailed`
naming the rows it leaves, and the actor schedules them again. The client is aiohttp's,
the library the daemon's HTTP server already runs on: one session (a connection pool and
a timeout per request) shared by the channels.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson

from worker.config import NotifySettings, WebhookSettings
from worker.retry import describe
from worker.rules.events import fired_at_of, parse_time
from worker.sinks.notify.outbox import OutboxRow, alertmanager_channel

SIGNATURE_HEADER = "X-IoTFlow-Signature"
TIMESTAMP_HEADER = "X-IoTFlow-Timestamp"
EVENT_KEY_HEADER = "X-IoTFlow-Event-Key"
USER_AGENT = "iotflow-worker"


class DeliveryFailed(Exception):
    """The receiver did not take `rows` (the first of them is the one that failed)."""

    def __init__(self, rows: Sequence[OutboxRow], error: str) -> None:
        super().__init__(error)
        self.rows = list(rows)
        self.error = error


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=` and the hex HMAC-SHA256 of `{timestamp}.{body}` under the endpoint's secret."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


# Device facts a label needs: name, owner, groups (read per batch from PostgreSQL).
DeviceFacts = Mapping[int, Mapping[str, Any]]


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def alertmanager_alert(
    body: Mapping[str, Any], facts: DeviceFacts, now: datetime, valid_s: float, link_url: str
) -> dict[str, Any]:
    """One alert of Alertmanager's `postableAlerts`: labels say which alert it is (its
    identity there), annotations what happened. Active: valid until `now + valid_s`, so
    Alertmanager resolves it by itself if nobody refreshes it; resolved: ends at the
    reading that cleared it."""
    device_id = int(body["device_id"])
    device = facts.get(device_id, {})
    details = body.get("details") or {}
    labels = {
        "alertname": str(body.get("rule_id", "")),
        "alert_type": str(body.get("alert_type", "")),
        "severity": str(body.get("severity", "")),
        "device_id": str(device_id),
        "device": str(device.get("name") or device_id),
        "measurement": str(details.get("measurement") or ""),
        "user": str(device.get("user") or body.get("user_id") or ""),
        "groups": ",".join(device.get("groups") or ()),
        "source": "iotflow",
    }
    annotations = {
        "message": str(body.get("message", "")),
        "alert_id": str(body["alert_id"]),
        **{key: str(details[key]) for key in ("value", "threshold", "unit") if details.get(key) is not None},
    }
    link = link_url.format(alert_id=body["alert_id"]) if link_url else ""
    if link:
        annotations["link"] = link
    starts = fired_at_of(str(body["alert_id"]))
    if body.get("status") == "resolved":
        ends = max(parse_time(body.get("at")) or now, starts)
    else:
        ends = max(now, starts) + timedelta(seconds=valid_s)
    alert = {
        "labels": {key: value for key, value in labels.items() if value},
        "annotations": annotations,
        "startsAt": _iso(starts),
        "endsAt": _iso(ends),
    }
    if link:
        alert["generatorURL"] = link
    return alert


class AlertmanagerChannel:
    """`POST {url}/api/v2/alerts` with lists of up to `notify.batch_size` alerts."""

    def __init__(self, url: str, settings: NotifySettings, client: aiohttp.ClientSession) -> None:
        self.name = alertmanager_channel(url)
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        self._settings = settings
        self._client = client

    @property
    def valid_s(self) -> float:
        return 4 * self._settings.refresh_s  # as Prometheus: four missed refreshes resolve it

    async def post(self, alerts: list[dict[str, Any]]) -> None:
        await post_json(self._client, self.endpoint, orjson.dumps(alerts), {})

    async def send(self, rows: Sequence[OutboxRow], facts: DeviceFacts, deadline: float) -> int:
        """How many of `rows` were delivered before `deadline` (monotonic) came."""
        now = datetime.now(UTC)
        size = self._settings.batch_size
        for start in range(0, len(rows), size):
            if time.monotonic() > deadline:
                return start
            chunk = rows[start : start + size]
            alerts = [
                alertmanager_alert(row.body, facts, now, self.valid_s, self._settings.link_url)
                for row in chunk
            ]
            try:
                await self.post(alerts)
            except DeliveryFailed as exc:
                raise DeliveryFailed(rows[start:], exc.error) from exc
        return len(rows)


class WebhookChannel:
    """One signed `POST` per event, in outbox order; the first failure leaves the rest."""

    def __init__(self, hook: WebhookSettings, client: aiohttp.ClientSession) -> None:
        self.name = hook.channel
        self._hook = hook
        self._client = client

    async def post(self, body: Mapping[str, Any], event_key: str) -> None:
        content = orjson.dumps(body)
        timestamp = str(int(time.time()))
        headers = {
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._hook.secret, timestamp, content),
            EVENT_KEY_HEADER: event_key,
        }
        await post_json(self._client, self._hook.url, content, headers)

    async def send(self, rows: Sequence[OutboxRow], facts: DeviceFacts, deadline: float) -> int:
        """How many of `rows` were delivered before `deadline` (monotonic) came."""
        for index, row in enumerate(rows):
            if time.monotonic() > deadline:
                return index
            try:
                await self.post(row.body, row.event_key)
            except DeliveryFailed as exc:
                raise DeliveryFailed(rows[index:], exc.error) from exc
        return len(rows)


Channel = AlertmanagerChannel | WebhookChannel


def http_client(settings: NotifySettings) -> aiohttp.ClientSession:
    """The channels' session; opened in the loop that uses it, closed by its owner."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=settings.timeout_s), headers={"User-Agent": USER_AGENT}
    )


async def post_json(client: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> None:
    """POST a JSON body; DeliveryFailed (naming no rows yet) unless the answer is 2xx."""
    try:
        async with client.post(
            url, data=body, headers={"Content-Type": "application/json", **headers}
        ) as response:
            if not 200 <= response.status < 300:
                text = await response.text(errors="replace")
                raise DeliveryFailed([], f"HTTP {response.status}: {text[:200]}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DeliveryFailed([], describe(exc)) from exc


def build_channels(settings: NotifySettings, client: aiohttp.ClientSession) -> dict[str, Channel]:
    channels: dict[str, Channel] = {}
    for url in settings.alertmanager_urls:
        channels[alertmanager_channel(url)] = AlertmanagerChannel(url, settings, client)
    for hook in settings.webhooks:
        channels[hook.channel] = WebhookChannel(hook, client)
    return channels


DEVICE_FACTS_SQL = """
SELECT d.id, d.name, u.username AS user,
       coalesce(array_agg(g.name ORDER BY g.name) FILTER (WHERE g.name IS NOT NULL), '{}') AS groups
FROM devices d
LEFT JOIN users u ON u.id = d.user_id
LEFT JOIN device_group_members m ON m.device_id = d.id
LEFT JOIN device_groups g ON g.id = m.group_id
WHERE d.id = ANY($1::int[])
GROUP BY d.id, u.username
"""
