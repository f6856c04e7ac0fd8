"""The MongoDB indexes of the document collections (docs/storage.md), applied by `iotflow migrate`.

Every document's `_id` is its deterministic key (alert ids, event keys, report keys,
`str(device_id)` for metadata, …), so a redelivered write meets its own `_id` and is a
no-op; the unique indexes below keep the natural keys unique as well, whoever writes.
The PostgreSQL JSONB backend has the same uniqueness and lookups as expression indexes
on the `documents` table (schemas/sql/0005_documents.sql, 0017_document_indexes.sql).

TTL indexes follow the retention settings (`jobs.retention_*_days`, 0: kept forever):
MongoDB then expires documents by itself, by the same field and cutoff the retention
job uses on either backend (`created_at`; for alerts only resolved ones).

A server may refuse an index kind (FerretDB 1.24: partial, TTL and 2dsphere indexes):
each index says what the daemon does instead (`instead`, in migrate's line), and may name
a `fallback` index that migrate creates in its place (docs/storage.md, "MongoDB or FerretDB").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DAY_S = 86_400


@dataclass(frozen=True)
class MongoIndex:
    collection: str
    name: str
    keys: tuple[tuple[str, int | str], ...]
    unique: bool = False
    partial: dict[str, Any] | None = None
    expire_after_s: int | None = None  # a TTL index
    # When the server refuses this index: what keeps its promise (one line of migrate's)…
    instead: str = ""
    # …and an index it accepts, created in its place (dropped once this one exists).
    fallback: MongoIndex | None = None


# Names of the TTL indexes: dropped again when their retention is set to 0.
EVENT_LOGS_TTL = "event_logs_ttl"
RESOLVED_ALERTS_TTL = "alerts_resolved_ttl"
TTL_INDEXES = {("event_logs", EVENT_LOGS_TTL), ("alerts", RESOLVED_ALERTS_TTL)}


def mongo_indexes(event_logs_days: int, resolved_alerts_days: int) -> list[MongoIndex]:
    """The indexes the code's queries and the retention settings ask for."""
    indexes = [
        # rules source: configs per device; group and global configs have no device_id
        MongoIndex("device_configs", "device_configs_device", (("device_id", 1),)),
        # `alerts list [--active] [--device]`, newest first; rules state: active alerts
        MongoIndex("alerts", "alerts_status_created", (("status", 1), ("created_at", -1))),
        MongoIndex("alerts", "alerts_device_created", (("device_id", 1), ("created_at", -1))),
        # the alert sink's and the rules actor's "not announced yet" look-up: a small index
        MongoIndex(
            "event_logs",
            "event_logs_pending",
            (("notified", 1),),
            partial={"notified": False},
            instead="a full index on notified (event_logs_notified) serves the same look-up",
            fallback=MongoIndex("event_logs", "event_logs_notified", (("notified", 1),)),
        ),
        MongoIndex("event_logs", "event_logs_device_time", (("device_id", 1), ("timestamp", -1))),
        # reports: maintenance events per device in a period
        MongoIndex("event_logs", "event_logs_type_time", (("event_type", 1), ("timestamp", 1))),
        MongoIndex(
            "analytics",
            "analytics_report",
            (("report_type", 1), ("device_id", 1), ("period.start", 1), ("period.end", 1)),
            unique=True,
        ),
        MongoIndex("user_preferences", "user_preferences_user", (("user_id", 1),), unique=True),
        MongoIndex("device_metadata", "device_metadata_device", (("device_id", 1),), unique=True),
        MongoIndex(
            "device_metadata",
            "device_metadata_location",
            (("location", "2dsphere"),),
            instead="`devices near` reads a bounding box on location.coordinates, then the exact distance",
        ),
        MongoIndex("device_metadata", "device_metadata_tags", (("tags", 1),)),
    ]
    if event_logs_days:
        indexes.append(
            MongoIndex(
                "event_logs",
                EVENT_LOGS_TTL,
                (("created_at", 1),),
                expire_after_s=event_logs_days * DAY_S,
                instead=f"the retention job deletes event logs {event_logs_days} days after created_at",
            )
        )
    if resolved_alerts_days:
        indexes.append(
            MongoIndex(
                "alerts",
                RESOLVED_ALERTS_TTL,
                (("created_at", 1),),
                partial={"status": "resolved"},
                expire_after_s=resolved_alerts_days * DAY_S,
                instead=f"the retention job deletes resolved alerts {resolved_alerts_days} days after "
                "created_at",
            )
        )
    return indexes
