"""The notification outbox: one row per alert event and channel, in PostgreSQL.

The alert sink enqueues rows for an event before it marks the event announced in
`event_logs` (worker/sinks/alerts.py): that flag is the commit point, so an event is
either announced with its rows or re-announced later, whichever store the documents
live in (MongoDB has no transaction shared with PostgreSQL). Rows are unique per
(channel, event key), so announcing again adds nothing while they wait. The delivery
actor locks due rows in a transaction for one round (`FOR UPDATE SKIP LOCKED`: other
workers take other rows; a worker that dies frees them at once), deletes the delivered
ones and schedules the next attempt of the others, and commits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

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


Queries = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy  # what runs a statement


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    channel: str
    event_key: str
    alert_id: str
    body: dict[str, Any]
    attempts: int

    @classmethod
    def of(cls, r: asyncpg.Record) -> OutboxRow:
        return cls(
            r["id"], r["channel"], r["event_key"], r["alert_id"], orjson.loads(r["body"]), r["attempts"]
        )


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
            "SELECT c, k, a, b::json FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
            "AS t(c, k, a, b) ON CONFLICT (channel, event_key) DO NOTHING RETURNING id",
            channels,
            keys,
            alerts,
            bodies,
        )
        if rows:
            self.added.set()
        return len(rows)

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[Claim]:
        """Up to `limit` due rows of configured channels, oldest first, locked for the block
        (a transaction: other workers skip them; if this one dies, they are free at once)."""
        async with self._pool.acquire() as conn, conn.transaction():
            records = await conn.fetch(
                "SELECT id, channel, event_key, alert_id, body::text AS body, attempts "
                "FROM notification_outbox WHERE next_attempt_at <= now() AND channel = ANY($2::text[]) "
                "ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED",
                limit,
                self.channels,
            )
            rows = [OutboxRow.of(record) for record in records]
            yield Claim(conn, sorted(rows, key=lambda row: row.id), self.backoff)

    async def pending(self) -> int:
        """Rows not delivered yet, due or waiting for their next attempt."""
        return int(await self._pool.fetchval("SELECT count(*) FROM notification_outbox"))


@dataclass(frozen=True, slots=True)
class Claim:
    """Rows locked by one delivery round, and how to settle them: in its transaction."""

    conn: Queries
    rows: list[OutboxRow]
    backoff: Backoff

    async def delivered(self, rows: Collection[OutboxRow]) -> None:
        if rows:
            await self.conn.execute(
                "DELETE FROM notification_outbox WHERE id = ANY($1::bigint[])", [row.id for row in rows]
            )

    async def failed(self, rows: Collection[OutboxRow], error: str) -> None:
        """Count the attempt and schedule the next one, each row after its own backoff."""
        if rows:
            await self.conn.execute(
                "UPDATE notification_outbox o SET attempts = o.attempts + 1, last_error = $3, "
                "next_attempt_at = now() + make_interval(secs => t.delay) "
                "FROM unnest($1::bigint[], $2::float8[]) AS t(id, delay) WHERE o.id = t.id",
                [row.id for row in rows],
                [self.backoff.delay(row.attempts + 1) for row in rows],
                error[:500],
            )


async def delivery_state(pool: asyncpg.Pool, alert_ids: Collection[str]) -> dict[str, list[dict[str, Any]]]:
    """Per alert, each notification not delivered yet: channel, event, attempts, the last
    error and when it is tried next (`iotflow alerts list`)."""
    if not alert_ids:
        return {}
    rows = await pool.fetch(
        "SELECT alert_id, channel, event_key, attempts, last_error, next_attempt_at "
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
                "last_error": r["last_error"],
                "next_attempt_at": r["next_attempt_at"],
            }
        )
    return state
