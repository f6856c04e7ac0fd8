"""Alert events and the documents and notifications made from them (docs/rules.md).

An `AlertEvent` is what the evaluator raises (`fired`, `resolved`) or the CLI
records (`acknowledged`). Everything stored or published for it is derived here,
deterministically, so a redelivered batch rebuilds byte-for-byte the same keys:
the alert id is `{rule_uid}:{device_id}:{event time}` where the event time is the
timestamp of the reading that fired it (or, for an offline alert, the moment the
device's silence passed the rule's duration).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from schemas.records import AlertEvent, EventKind

COMPACT_TIME = "%Y%m%dT%H%M%S.%fZ"  # an alert id's event time


class AlertWriter(Protocol):
    """What stores and announces alert events (worker/sinks/alerts.py): rules decide, a sink
    the pipeline wires stores and delivers."""

    async def write_events(self, events: Sequence[AlertEvent]) -> None: ...

    async def announce_pending(self) -> int: ...

    async def reset(self) -> None: ...


def alert_id(rule_uid: str, device_id: int, at: datetime) -> str:
    return f"{rule_uid}:{device_id}:{compact_time(at)}"


def fired_at_of(alert_id: str) -> datetime:
    """When the alert fired: the event time its id ends with (sliced: strptime costs more than
    the rest of an Alertmanager alert, and a storm builds thousands)."""
    t = alert_id.rsplit(":", 1)[-1]  # 20241122T051320.123456Z
    if len(t) != 23 or t[8] != "T" or t[15] != "." or t[22] != "Z":
        raise ValueError(f"{alert_id!r} does not end with an event time")
    return datetime(
        int(t[0:4]), int(t[4:6]), int(t[6:8]), int(t[9:11]), int(t[11:13]), int(t[13:15]), int(t[16:22]), UTC
    )


def compact_time(at: datetime) -> str:
    """UTC with microseconds, no separators that need quoting: 20241122T051320.123456Z."""
    return at.astimezone(UTC).strftime(COMPACT_TIME)


def alert_document(event: AlertEvent) -> dict[str, Any]:
    """The `alerts` document for a fired event."""
    return {
        "device_id": event.device_id,
        "user_id": event.user_id,
        "rule_id": event.rule_id,
        "alert_type": event.alert_type,
        "severity": event.severity,
        "message": event.message,
        "details": event.details,
        "status": "active",
        "acknowledged": False,
        "fired_at": event.at,
        "created_at": event.raised_at,
        "resolved_at": None,
    }


def alert_changes(event: AlertEvent) -> dict[str, Any]:
    """Top-level fields a resolved or acknowledged event sets on the existing alert document."""
    if event.kind == "resolved":
        return {"status": "resolved", "resolved_at": event.at, "resolution": event.details}
    return {"acknowledged": True, "acknowledged_at": event.at, "acknowledged_by": event.details.get("by")}


def event_log_document(event: AlertEvent) -> dict[str, Any]:
    """The `event_logs` entry; `notified` turns true once notifications went out."""
    return {
        "event_type": f"alert.{event.kind}",
        "device_id": event.device_id,
        "user_id": event.user_id,
        "timestamp": event.at,
        "details": {
            "alert_id": event.alert_id,
            "rule_id": event.rule_id,
            "alert_type": event.alert_type,
            "severity": event.severity,
            "message": event.message,
            **event.details,
        },
        "metadata": {"source": "rules"},
        "created_at": event.raised_at,
        "notified": False,
    }


_LOG_FIELDS = ("alert_id", "rule_id", "alert_type", "severity", "message")
_LOG_KINDS: dict[str, EventKind] = {f"alert.{k}": k for k in ("fired", "resolved", "acknowledged")}


def event_from_log(doc: Mapping[str, Any]) -> AlertEvent | None:
    """The event an `event_logs` entry was made from (None for entries not written by rules)."""
    kind = _LOG_KINDS.get(str(doc.get("event_type")))
    details = doc.get("details")
    if kind is None or not isinstance(details, dict) or (doc.get("metadata") or {}).get("source") != "rules":
        return None
    at = parse_time(doc.get("timestamp"))
    raised_at = parse_time(doc.get("created_at")) or at
    if at is None or raised_at is None:
        return None
    return AlertEvent(
        kind,
        str(details["alert_id"]),
        str(details["rule_id"]),
        int(doc["device_id"]),
        doc.get("user_id"),
        str(details.get("alert_type", "")),
        str(details.get("severity", "warning")),
        str(details.get("message", "")),
        at,
        raised_at,
        {k: v for k, v in details.items() if k not in _LOG_FIELDS},
    )


def notification(event: AlertEvent) -> dict[str, Any]:
    """What goes on `alerts:{device_id}` and the pub/sub channels."""
    return {
        "event": f"alert.{event.kind}",
        "alert_id": event.alert_id,
        "rule_id": event.rule_id,
        "device_id": event.device_id,
        "user_id": event.user_id,
        "alert_type": event.alert_type,
        "severity": event.severity,
        "message": event.message,
        "details": event.details,
        "status": "resolved" if event.kind == "resolved" else "active",
        "at": event.at,
    }


def alert_notification(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The notification of an `alerts` document's current state (what its last event said)."""
    resolved = doc.get("status") == "resolved"
    return {
        "event": "alert.resolved" if resolved else "alert.fired",
        "alert_id": doc["_id"],
        "rule_id": doc.get("rule_id"),
        "device_id": doc.get("device_id"),
        "user_id": doc.get("user_id"),
        "alert_type": doc.get("alert_type"),
        "severity": doc.get("severity"),
        "message": doc.get("message"),
        "details": doc.get("details") or {},
        "status": "resolved" if resolved else "active",
        "at": doc.get("resolved_at") if resolved else doc.get("fired_at"),
    }


def parse_time(value: Any) -> datetime | None:
    """A stored time back to a datetime: MongoDB keeps datetimes, PostgreSQL JSONB ISO text."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError(f"{value!r} is not a time")
