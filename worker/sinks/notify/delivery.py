"""The notification actor: sends what the outbox holds, and keeps Alertmanager's alerts alive.

Off the ingest path: the alert sink only inserts outbox rows, so a receiver that is
down holds nothing but its own rows, which wait with backoff (`notify.retry_first_s`
doubling up to `notify.retry_max_s`) in PostgreSQL, across restarts. Each round locks
up to `notify.batch_size` due rows, sends them channel by channel, concurrently (a
channel's failure reschedules its rows and leaves the others alone), deletes what was
delivered and commits (worker/sinks/notify/outbox.py). Woken at once when
this process enqueued rows, otherwise every `notify.poll_s` (rows of other processes,
retries). Every `notify.refresh_s` the active alerts are sent to Alertmanager again,
as Prometheus does, so that Alertmanager keeps them firing; it resolves an alert
nobody refreshed for four periods by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

import aiohttp
import structlog

from worker.metrics import Metrics
from worker.retry import describe, retry_transient
from worker.rules.events import alert_notification
from worker.rules.source import ALL
from worker.runtime.actor import Actor
from worker.runtime.cancel import cancel_and_wait
from worker.sinks.notify.channels import (
    DEVICE_FACTS_SQL,
    AlertmanagerChannel,
    Channel,
    DeliveryFailed,
    DeviceFacts,
    alertmanager_alert,
    build_channels,
    http_client,
)
from worker.sinks.notify.outbox import NotificationOutbox, OutboxRow, Queries
from worker.stores import Stores

log = structlog.get_logger("worker.notify")

# A round starts no request after this many request timeouts: its transaction stays short.
ROUND_TIMEOUTS = 3


class NotificationActor(Actor):
    name = "notify"

    def __init__(self, stores: Stores, outbox: NotificationOutbox, metrics: Metrics) -> None:
        self._stores = stores
        self._outbox = outbox
        self._settings = outbox.settings
        self._metrics = metrics
        self._client: aiohttp.ClientSession | None = None
        self._channels: dict[str, Channel] = {}
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._task: asyncio.Task[object] | None = None
        self._failing: dict[str, str] = {}  # channel → last error, while it fails
        self._pending = 0
        metrics.gauges["notifications_pending"] = lambda: float(self._pending)
        metrics.labeled_gauges["notification_channel_failing"] = self._failing_gauges()

    def _failing_gauges(self) -> dict[tuple[str, ...], Callable[[], float]]:
        return {(name,): partial(self._is_failing, name) for name in self._outbox.channels}

    def _is_failing(self, channel: str) -> float:
        return float(channel in self._failing)

    # --- lifetime ------------------------------------------------------------------------------

    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            await self._run()
        finally:
            self._finished.set()

    async def _run(self) -> None:
        self._client = http_client(self._settings)
        self._channels = build_channels(self._settings, self._client)
        next_refresh = time.monotonic()
        while not self._stopping.is_set():
            self._outbox.added.clear()
            claimed = await retry_transient(self._round, "notify.outbox")
            now = time.monotonic()
            if now >= next_refresh and self._settings.alertmanager_urls:
                next_refresh = now + self._settings.refresh_s
                await self._refresh()
            self._pending = await retry_transient(self._outbox.pending, "notify.outbox")
            if claimed < self._settings.batch_size:  # a full claim: more may be due at once
                await self._wait()

    async def _wait(self) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in (self._outbox.added, self._stopping)]
        try:
            await asyncio.wait(waits, timeout=self._settings.poll_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def stop(self) -> None:
        """Ends after the round under way; rows not sent yet stay in the outbox for the next start.
        A round that outlasts one request timeout (PostgreSQL away: the outbox is waited for)
        is cancelled: its transaction rolls back, and its rows stay due."""
        self._stopping.set()
        try:
            async with asyncio.timeout(self._settings.timeout_s + 1):
                await asyncio.shield(self._finished.wait())
        except TimeoutError:
            if self._task is not None:
                await cancel_and_wait(self._task)
            await self._finished.wait()

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    # --- delivery ------------------------------------------------------------------------------

    async def _round(self) -> int:
        """Claim due rows, send them, settle them; how many were claimed. PostgreSQL lost midway
        rolls the round back: its rows are sent again (at least once)."""
        async with self._outbox.claim(self._settings.batch_size) as claim:
            if not claim.rows:
                return 0
            by_channel: dict[str, list[OutboxRow]] = defaultdict(list)
            for row in claim.rows:
                by_channel[row.channel].append(row)
            alerting = {int(r.body["device_id"]) for r in claim.rows if r.channel.startswith("alertmanager ")}
            facts = await self._facts(claim.conn, alerting)
            # Requests start only within the round's budget: the transaction stays short.
            deadline = time.monotonic() + ROUND_TIMEOUTS * self._settings.timeout_s
            sends = [
                self._send(self._channels[name], rows, facts, deadline) for name, rows in by_channel.items()
            ]
            outcomes = await asyncio.gather(*sends)
            # Settled one after the other: the claim's connection runs one statement at a time.
            for sent, failure in outcomes:
                await claim.delivered(sent)
                if failure is not None:
                    await claim.failed(failure.rows, failure.error)
            return len(claim.rows)

    async def _send(
        self, channel: Channel, rows: list[OutboxRow], facts: DeviceFacts, deadline: float
    ) -> tuple[list[OutboxRow], DeliveryFailed | None]:
        """(the rows the channel took, its failure with the rows it left); rows not tried before
        the deadline are in neither, and stay due as they were."""
        kind = channel.name.split(" ", 1)[0]
        try:
            count = await channel.send(rows, facts, deadline)
        except DeliveryFailed as exc:
            left = {row.id for row in exc.rows}
            sent = [row for row in rows if row.id not in left]
            self._metrics.inc("notifications_sent", len(sent), channel=kind)
            self._metrics.inc("notifications_failed", len(exc.rows), channel=kind)
            if channel.name not in self._failing:  # once per outage, not per retry
                log.warning(
                    "notify.channel_failing", channel=channel.name, error=exc.error, waiting=len(exc.rows)
                )
            self._failing[channel.name] = exc.error
            return sent, exc
        self._metrics.inc("notifications_sent", count, channel=kind)
        if self._failing.pop(channel.name, None) is not None:
            log.info("notify.channel_recovered", channel=channel.name)
        log.info("notify.sent", channel=channel.name, notifications=count)
        return rows[:count], None

    @staticmethod
    async def _facts(conn: Queries, device_ids: set[int]) -> DeviceFacts:
        """Device name, owner and groups for Alertmanager's labels."""
        if not device_ids:
            return {}
        records = await conn.fetch(DEVICE_FACTS_SQL, sorted(device_ids))
        return {r["id"]: {"name": r["name"], "user": r["user"], "groups": list(r["groups"])} for r in records}

    async def _refresh(self) -> None:
        """Send every active alert to every Alertmanager again (not through the outbox: the
        next refresh repeats it anyway). A failure is logged and waits for the next period."""
        try:
            docs = await self._stores.documents.find("alerts", {"status": "active"}, limit=ALL)
            bodies = [alert_notification(doc) for doc in docs]
            facts = await self._facts(self._stores.postgres, {int(body["device_id"]) for body in bodies})
        except Exception as exc:  # a store away: the next period tries again
            log.warning("notify.refresh_failed", error=describe(exc))
            return
        if not bodies:
            return
        now = datetime.now(UTC)
        for channel in self._channels.values():
            if not isinstance(channel, AlertmanagerChannel):
                continue
            alerts = [
                alertmanager_alert(b, facts, now, channel.valid_s, self._settings.link_url) for b in bodies
            ]
            size = self._settings.batch_size
            try:
                for start in range(0, len(alerts), size):
                    await channel.post(alerts[start : start + size])
            except DeliveryFailed as exc:
                log.warning("notify.refresh_failed", channel=channel.name, error=exc.error)
