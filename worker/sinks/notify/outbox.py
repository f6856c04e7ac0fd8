"""The notification outbox: one row per alert event and channel, in PostgreSQL.

The alert sink enqueues rows for an event before it marks the event announced in
`event_logs` (worker/sinks/alerts.py): that flag is the commit point, so an event is
either announced with its rows or re-announced later, whichever store the documents
live in (MongoDB has no transaction shared with PostgreSQL). Rows are unique per
(channel, event key), so announcing again adds nothing. The delivery actor claims due
rows by pushing their `next_attempt_at` ahead (a lease: a process that dies holding them
frees them when it runs out), then marks them delivered or schedules the next attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from schemas.records import AlertEvent
from worker.config import NotifySettings, WebhookSettings
from worker.retry import Backoff
from worker.rules.events import notification

ALERTMANAGER_KINDS = frozenset({"fired", "resolved"})  # Alertmanager has its own acknowledgement: silences


def alertmanager_channel(url: str) -> str:
    return f"alertmanager {url}"


def wants(hook: WebhookSettings, event: AlertEvent) -> bool:
    """The webhook's filters: empty ones take everything."""
    if hook.rules and event.rule_id not in hook.rules:
        return False
    return not hook.users or event.user_id in hook.users


def notification_body(event: AlertEvent) -> dict[str, Any]:
    """What a receiver gets: the published notification plus its deduplication key."""
    return {**notification(event), "event_key": event.event_key}


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    channel: str
    event_key: str
    alert_id: str
    body: dict[str, Any]
    attempts: int


class NotificationOutbox:
    """Rows in `notification_outbox`; `added` is set when this process enqueued some."""

    def __init__(self, pool: asyncpg.Pool, settings: NotifySettings) -> None:
        self._pool = pool
        self.settings = settings
        self.backoff = Backoff(settings.retry_first_s, settings.retry_max_s)
        self.added = asyncio.Event()
        self.channels = [alertmanager_channel(url) for url in settings.alertmanager_urls] + [
            hook.channel for hook in settings.webhooks
        ]

    def channels_for(self, event: AlertEvent) -> list[str]:
        channels = []
        if event.kind in ALERTMANAGER_KINDS:
            channels += [alertmanager_channel(url) for url in self.settings.alertmanager_urls]
        channels += [hook.channel for hook in self.settings.webhooks if wants(hook, event)]
        return channels

    async def enqueue(self, events: Sequence[AlertEvent]) -> int:
        """Rows for `events` on every channel that wants them, in one statement; how many
        were new (a repeat of an event adds none)."""
        channels, keys, alerts, bodies = [], [], [], []
        for event in events:
            body = orjson.dumps(notification_body(event)).decode()
            for channel in self.channels_for(event):
                channels.append(channel)
                keys.append(event.event_key)
                alerts.append(event.alert_id)
                bodies.append(body)
        if not channels:
            return 0
        rows = await self._pool.fetch(
            "INSERT INTO notification_outbox (channel, event_key, alert_id, body) "
            "SELECT c, k, a, b::jsonb FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
            "AS t(c, k, a, b) ON CONFLICT (channel, event_key) DO NOTHING RETURNING id",
            channels,
            keys,
            alerts,
            bodies,
        )
        if rows:
            self.added.set()
        return len(rows)

    async def claim(self, limit: int, lease_s: float) -> list[OutboxRow]:
        """Up to `limit` due rows of configured channels, oldest first, leased for `lease_s`."""
        rows = await self._pool.fetch(
            "UPDATE notification_outbox o SET next_attempt_at = now() + make_interval(secs => $2) "
            "FROM (SELECT id FROM notification_outbox WHERE delivered_at IS NULL "
            "AND next_attempt_at <= now() AND channel = ANY($3::text[]) "
            "ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED) due "
            "WHERE o.id = due.id "
            "RETURNING o.id, o.channel, o.event_key, o.alert_id, o.body::text AS body, o.attempts",
            limit,
            lease_s,
            self.channels,
        )
        return sorted(
            (
                OutboxRow(
                    r["id"],
                    r["channel"],
                    r["event_key"],
                    r["alert_id"],
                    orjson.loads(r["body"]),
                    r["attempts"],
                )
                for r in rows
            ),
            key=lambda row: row.id,
        )

    async def delivered(self, rows: Collection[OutboxRow]) -> None:
        if rows:
            await self._pool.execute(
                "UPDATE notification_outbox SET delivered_at = now(), attempts = attempts + 1, "
                "last_error = NULL WHERE id = ANY($1::bigint[])",
                [row.id for row in rows],
            )

    async def release(self, rows: Collection[OutboxRow]) -> None:
        """Rows claimed but not tried (the round ran out of time): due again at once."""
        if rows:
            await self._pool.execute(
                "UPDATE notification_outbox SET next_attempt_at = now() WHERE id = ANY($1::bigint[])",
                [row.id for row in rows],
            )

    async def failed(self, rows: Collection[OutboxRow], error: str) -> None:
        """Count the attempt and schedule the next one, each row after its own backoff."""
        if rows:
            await self._pool.execute(
                "UPDATE notification_outbox o SET attempts = o.attempts + 1, last_error = $3, "
                "next_attempt_at = now() + make_interval(secs => t.delay) "
                "FROM unnest($1::bigint[], $2::float8[]) AS t(id, delay) WHERE o.id = t.id",
                [row.id for row in rows],
                [self.backoff.delay(row.attempts + 1) for row in rows],
                error[:500],
            )

    async def pending(self) -> int:
        """Rows not delivered yet, due or waiting for their next attempt."""
        return int(
            await self._pool.fetchval("SELECT count(*) FROM notification_outbox WHERE delivered_at IS NULL")
        )

    async def purge(self) -> int:
        """Remove delivered rows older than `notify.keep_delivered_s`."""
        status = await self._pool.execute(
            "DELETE FROM notification_outbox WHERE delivered_at < now() - make_interval(secs => $1)",
            self.settings.keep_delivered_s,
        )
        return int(status.split()[-1])


async def delivery_state(pool: asyncpg.Pool, alert_ids: Collection[str]) -> dict[str, list[dict[str, Any]]]:
    """Per alert, each outbox row: channel, event, attempts, delivered or the last error
    (`iotflow alerts list`)."""
    if not alert_ids:
        return {}
    rows = await pool.fetch(
        "SELECT alert_id, channel, event_key, attempts, last_error, delivered_at, next_attempt_at "
        "FROM notification_outbox WHERE alert_id = ANY($1::text[]) ORDER BY id",
        list(alert_ids),
    )
    state: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        state.setdefault(r["alert_id"], []).append(
            {
                "channel": r["channel"],
                "event": r["event_key"].rsplit(":", 1)[-1],
                "attempts": r["attempts"],
                "delivered": r["delivered_at"] is not None,
                "last_error": r["last_error"],
                "next_attempt_at": None if r["delivered_at"] else r["next_attempt_at"],
            }
        )
    return state
