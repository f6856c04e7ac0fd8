"""Reading and acknowledging stored alerts (`iotflow alerts …`).

An acknowledgement goes through the same `AlertSink` as fired and resolved
events, so it gets its `event_logs` entry, its place on `alerts:{device_id}` and
its notification the same way, and repeating it changes nothing.
"""

from __future__ import annotations

from typing import Any

from schemas.records import AlertEvent
from worker.rules.evaluator import Clock, utc_now
from worker.rules.events import AlertWriter
from worker.stores.documents import DocumentStore


async def list_alerts(
    documents: DocumentStore,
    *,
    active: bool = False,
    device_id: int | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Newest first."""
    where: dict[str, Any] = {}
    if active:
        where["status"] = "active"
    if device_id is not None:
        where["device_id"] = device_id
    return await documents.find("alerts", where, order_by="created_at", descending=True, limit=limit)


async def acknowledge(
    documents: DocumentStore, sink: AlertWriter, alert_id: str, by: str | None, clock: Clock = utc_now
) -> dict[str, Any] | None:
    """Mark the alert acknowledged; None when there is no such alert. Idempotent."""
    doc = await documents.get("alerts", alert_id)
    if doc is None:
        return None
    if doc.get("acknowledged"):
        return doc
    now = clock()
    event = AlertEvent(
        "acknowledged",
        alert_id,
        str(doc.get("rule_id", "")),
        int(doc["device_id"]),
        doc.get("user_id"),
        str(doc.get("alert_type", "")),
        str(doc.get("severity", "warning")),
        f"acknowledged{f' by {by}' if by else ''}: {doc.get('message', '')}",
        now,
        now,
        {"by": by} if by else {},
    )
    await sink.write_events([event])
    return await documents.get("alerts", alert_id)
