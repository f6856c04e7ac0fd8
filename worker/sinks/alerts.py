"""Alert sink: alert events → `alerts` and `event_logs` documents, `alerts:{device_id}`, pub/sub.

The writer calls it with every batch, like the other sinks, so a message is
acknowledged only once the alerts it caused are stored. The rules actor is handed
the same instance (the pipeline wires both) for the offline alerts its timer raises,
which have no message.

Idempotent by construction: alert and event-log keys are deterministic (see
worker/rules/events.py); inserting an existing key is a no-op (a batch's documents go
in one bulk insert per collection), updates set the
same fields to the same values. Notifications are at least once: an event log
entry is written first, with `notified: false`, and flipped after the Redis
pipeline has run and the notification outbox has its rows (worker/sinks/notify/outbox.py:
the flag is the commit point of both); an entry a crash left unflipped is announced by a redelivery of
the same event, or at the latest by `announce_pending`, which the rules actor runs
at start (a redelivered reading already judged raises no event to redeliver).
Order-tolerant: the two callers write independently, so a resolution can be
stored before its alert; the alert's insert then applies the logged resolution.
Each side logs before it touches `alerts`, so racing each other one of them sees
the other's write.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import structlog

from schemas.records import AlertEvent, DecodedBatch
from worker.rules.events import (
    alert_changes,
    alert_document,
    event_from_log,
    event_log_document,
    notification,
)
from worker.rules.source import ALL
from worker.sinks.notify.outbox import NotificationOutbox
from worker.stores import Stores
from worker.stores.documents import DocumentStore
from worker.stores.keys import RECENT_ALERTS_TTL_S

log = structlog.get_logger("worker.sinks.alerts")


class AlertSink:
    name = "alerts"

    def __init__(self, stores: Stores, outbox: NotificationOutbox | None = None) -> None:
        """`outbox`: where notifications to Alertmanager and webhooks go (None: none configured)."""
        self._stores = stores
        self._outbox = outbox
        self._docs = stores.documents
        self._keys = stores.keys
        self._recent = stores.settings.rules.recent_alerts

    async def write(self, batch: DecodedBatch) -> None:
        if batch.alerts:
            await self.write_events(batch.alerts)

    async def write_events(self, events: Sequence[AlertEvent]) -> None:
        """Store then announce `events`, in order; safe to call again with the same events.

        The `event_logs` entry is written before the `alerts` document is touched, so
        each of the two writers (this sink in the writer, and in the rules actor) writes
        before it reads what the other may have written: a withdrawal racing the insert
        of its alert is seen by one side or the other, never missed by both.
        """
        docs = self._docs
        logged_now = await docs.insert_many(
            "event_logs", {event.event_key: event_log_document(event) for event in events}
        )
        fired = [event for event in events if event.kind == "fired"]
        if fired:
            await docs.insert_many("alerts", {event.alert_id: alert_document(event) for event in fired})
            await self._apply_early_resolutions(docs, fired)
        for event in events:
            if event.kind != "fired" and not await docs.update(
                "alerts", event.alert_id, alert_changes(event)
            ):
                # Not stored yet (see _apply_early_resolutions): the event log entry carries it.
                log.info("alerts.ahead_of_alert", alert_id=event.alert_id, kind=event.kind)
        # Logged before a crash or a retry: announce only if that did not happen yet.
        earlier = await docs.get_many(
            "event_logs", [event.event_key for event in events if event.event_key not in logged_now]
        )
        unannounced = [
            event
            for event in events
            if event.event_key in logged_now or not earlier.get(event.event_key, {}).get("notified")
        ]
        if unannounced:
            await self._announce(unannounced)
            await docs.update_many(
                "event_logs", [event.event_key for event in unannounced], {"notified": True}
            )

    async def announce_pending(self) -> int:
        """Announce every rules event logged but never announced (`notified: false`): the
        process stopped between storing and announcing it. The rules actor runs this at
        start, because the redelivered reading that raised it is then skipped as judged."""
        docs = self._docs
        pending: list[AlertEvent] = []
        for doc in await docs.find("event_logs", {"notified": False}, limit=ALL):
            try:
                event = event_from_log(doc)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("alerts.log_unreadable", key=doc.get("_id"), error=repr(exc))
                continue
            if event is not None:
                pending.append(event)
        if pending:
            await self._announce(pending)
            await docs.update_many("event_logs", [event.event_key for event in pending], {"notified": True})
        return len(pending)

    @staticmethod
    async def _apply_early_resolutions(docs: DocumentStore, fired: Sequence[AlertEvent]) -> None:
        """A resolution may be stored first: the rules actor writes a withdrawal directly while
        the batch that fired the alert still waits in the writer. The log entry keeps it.
        Checked on every write of the alert, so a redelivery after a crash applies it too."""
        early = await docs.get_many("event_logs", [f"{event.alert_id}:resolved" for event in fired])
        for event in fired:
            resolution = early.get(f"{event.alert_id}:resolved")
            if resolution is not None:
                await docs.update(
                    "alerts",
                    event.alert_id,
                    {
                        "status": "resolved",
                        "resolved_at": resolution.get("timestamp"),
                        "resolution": resolution.get("details"),
                    },
                )

    async def _announce(self, events: Sequence[AlertEvent]) -> None:
        if self._outbox is not None:
            await self._outbox.enqueue(events)
        keys = self._keys
        async with self._stores.redis.pipeline(transaction=False) as pipe:
            for event in events:
                body = orjson.dumps(notification(event))
                recent = keys.alerts(event.device_id)
                pipe.lpush(recent, body)
                pipe.ltrim(recent, 0, self._recent - 1)
                pipe.expire(recent, RECENT_ALERTS_TTL_S)
                pipe.publish(keys.system_alerts_channel(), body)
                if event.user_id is not None:
                    pipe.publish(keys.user_notifications_channel(event.user_id), body)
            await pipe.execute()

    async def reset(self) -> None:
        """The store went away: replace the pool's connections on their next use (Redis and
        MongoDB clients reconnect by themselves)."""
        await self._stores.postgres.expire_connections()

    async def close(self) -> None:
        """The connections belong to `Stores`."""
