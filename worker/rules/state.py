"""What the evaluator resumes from at start: stored alerts, and when each device last reported.

Active alerts make a restart quiet (an alert already raised is not raised again,
an offline device stays offline); the most recently resolved alerts move the
watermarks past the readings that resolved them, so a batch the broker
redelivers after a crash cannot fire them again. Devices' `last_seen` is the
starting point of offline detection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import structlog

from worker.rules.evaluator import StoredAlert
from worker.rules.source import ALL
from worker.stores.documents import DocumentStore

log = structlog.get_logger("worker.rules")


@dataclass(slots=True)
class SavedState:
    alerts: list[StoredAlert] = field(default_factory=list)
    last_seen: dict[int, datetime] = field(default_factory=dict)
    users: dict[int, int | None] = field(default_factory=dict)


async def load_state(documents: DocumentStore, pool: asyncpg.Pool, resolved_limit: int) -> SavedState:
    """Active alerts, the `resolved_limit` newest resolved ones, and the devices' last reports."""
    state = SavedState()
    docs = await documents.find("alerts", {"status": "active"}, limit=ALL)
    if resolved_limit:
        docs += await documents.find(
            "alerts",
            {"status": "resolved"},
            order_by="created_at",
            descending=True,
            limit=resolved_limit,
        )
    for doc in docs:
        try:
            state.alerts.append(StoredAlert.from_document(doc))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("rules.alert_unreadable", alert_id=doc.get("_id"), error=repr(exc))
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT id, user_id, last_seen FROM devices WHERE status = 'active'")
    for row in rows:
        state.users[row["id"]] = row["user_id"]
        if row["last_seen"] is not None:
            state.last_seen[row["id"]] = row["last_seen"]
    return state
