"""Daily `device_health` reports (SPEC §5 `analytics`): uptime, data points, averages, alerts.

Uptime comes from the gaps in a device's data: after each reading the device counts as
up for its allowed silence (`devices.max_silence_s`, else `jobs.default_max_silence_s`)
or until its next reading, whichever comes first — the same rule by which the offline
sweep marks it offline. Readings shortly before the period count for its start. The
whole computation is one window-function query per period, in PostgreSQL.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import asyncpg

from jobs.context import JobResources
from jobs.periods import DAY, iso

COLLECTION = "analytics"
REPORT_TYPE = "device_health"
MAINTENANCE_EVENT = "device.maintenance"

_DEVICES = """
SELECT id, user_id FROM devices
WHERE created_at < $1 AND ($2::integer[] IS NULL OR id = ANY($2))
ORDER BY id
"""

# Each reading covers [t, min(t + silence, next reading, end)) clipped to the period; those
# spans are disjoint, so their sum is the time the device was up. Several datapoints of one
# message share a timestamp: GROUP BY keeps one row per instant.
_UPTIME = """
WITH silence AS (
    SELECT id AS device_id, make_interval(secs => coalesce(max_silence_s, $3::integer)) AS allowed
    FROM devices WHERE $4::integer[] IS NULL OR id = ANY($4)
), seen AS (
    SELECT device_id, timestamp AS t FROM decoded_data
    WHERE timestamp >= $1::timestamptz - (SELECT max(allowed) FROM silence) AND timestamp < $2::timestamptz
      AND ($4::integer[] IS NULL OR device_id = ANY($4))
    GROUP BY device_id, timestamp
), spans AS (
    SELECT seen.device_id, t, lead(t) OVER (PARTITION BY seen.device_id ORDER BY t) AS next_t, allowed
    FROM seen JOIN silence USING (device_id)
)
SELECT device_id,
       sum(greatest(extract(epoch FROM least(t + allowed, coalesce(next_t, $2), $2) - greatest(t, $1)), 0))
           ::float8 AS up_s
FROM spans GROUP BY device_id
"""

_AVERAGES = """
SELECT d.device_id, p.label, count(*) AS n, avg(d.value) AS mean
FROM decoded_data d JOIN datapoints p ON p.id = d.datapoint_id
WHERE d.timestamp >= $1 AND d.timestamp < $2 AND ($3::integer[] IS NULL OR d.device_id = ANY($3))
GROUP BY d.device_id, p.label
"""


def report_key(device_id: int, start: datetime, end: datetime) -> str:
    """`device_health:{device_id}:{period_start}`, with the length appended unless it is one day."""
    key = f"{REPORT_TYPE}:{device_id}:{iso(start)}"
    return key if end - start == DAY else f"{key}:{int((end - start).total_seconds())}s"


def metric_name(label: str) -> str:
    """`average_<measurement>`; dots and other punctuation would be paths in MongoDB."""
    return "average_" + re.sub(r"[^0-9A-Za-z]+", "_", label).strip("_")


async def build_reports(
    res: JobResources, start: datetime, end: datetime, device_ids: list[int] | None = None
) -> list[dict[str, Any]]:
    """One report per device existing before `end`; a period reaching into the future stops at now."""
    now = res.clock()
    effective_end = min(end, now)
    default_silence = res.settings.jobs.default_max_silence_s
    pool = res.pool
    devices = await pool.fetch(_DEVICES, end, device_ids)
    ids = [row["id"] for row in devices]
    if not ids:
        return []
    up_s: dict[int, float] = {}
    if effective_end > start:
        rows = await pool.fetch(_UPTIME, start, effective_end, default_silence, ids)
        up_s = {row["device_id"]: row["up_s"] for row in rows}
    series: dict[int, list[asyncpg.Record]] = {}
    for row in await pool.fetch(_AVERAGES, start, effective_end, ids):
        series.setdefault(row["device_id"], []).append(row)
    alerts = await res.docs.count_per_device("alerts", start, end)
    maintenance = await res.docs.count_per_device(
        "event_logs", start, end, time_field="timestamp", where={"event_type": MAINTENANCE_EVENT}
    )
    span_s = (effective_end - start).total_seconds()
    reports = []
    for device in devices:
        device_id = device["id"]
        metrics: dict[str, Any] = {
            "uptime_percentage": round(100.0 * up_s.get(device_id, 0.0) / span_s, 2) if span_s > 0 else None,
            "total_data_points": 0,
        }
        for row in series.get(device_id, []):
            metrics["total_data_points"] += row["n"]
            metrics[metric_name(row["label"])] = row["mean"]
        metrics["alerts_triggered"] = alerts.get(device_id, 0)
        metrics["maintenance_events"] = maintenance.get(device_id, 0)
        reports.append(
            {
                "report_type": REPORT_TYPE,
                "device_id": device_id,
                "user_id": device["user_id"],
                "period": {"start": start, "end": end},
                "metrics": metrics,
                "generated_at": now,
            }
        )
    return reports


async def store_reports(res: JobResources, reports: list[dict[str, Any]]) -> None:
    keyed = {report_key(r["device_id"], r["period"]["start"], r["period"]["end"]): r for r in reports}
    await res.docs.upsert_many(COLLECTION, keyed)
