"""Daily `device_health` reports (`analytics` documents): uptime, data points, averages, alerts.

Uptime comes from the gaps in a device's data: after each reading the device counts as
up for its allowed silence (`devices.max_silence_s`, else `jobs.default_max_silence_s`)
or until its next reading, whichever comes first — the same rule by which the offline
sweep marks it offline. Readings shortly before the period count for its start. The
whole computation is one window-function query per period, in PostgreSQL.

With `timeseries.backend = "cassandra"` the readings are not in PostgreSQL: then each
device's readings are read through worker/stores/timeseries.py (the range reads of
`iotflow query`, one partition slice a device, paged) and the same figures computed
here. Every report says which store answered (`store`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from jobs.context import JobResources
from jobs.periods import DAY, iso
from worker.stores.timeseries import Row, Store, read_device

COLLECTION = "analytics"
REPORT_TYPE = "device_health"
MAINTENANCE_EVENT = "device.maintenance"

_DEVICES = """
SELECT id, user_id, max_silence_s FROM devices
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

READ_PAGE = 5000  # rows per range read on the read-through path

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


@dataclass
class Figures:
    """What the readings of a period give: uptime seconds, and per device and measurement
    the readings counted and the mean of their values."""

    up_s: dict[int, float] = field(default_factory=dict)
    series: dict[int, list[tuple[str, int, float | None]]] = field(default_factory=dict)


def report_store(res: JobResources) -> Store:
    """PostgreSQL wherever it keeps the readings (`postgres`, `both`), else Cassandra."""
    return "cassandra" if res.settings.timeseries.backend == "cassandra" else "postgres"


async def build_reports(
    res: JobResources, start: datetime, end: datetime, device_ids: list[int] | None = None
) -> list[dict[str, Any]]:
    """One report per device existing before `end`; a period reaching into the future stops at now."""
    now = res.clock()
    effective_end = min(end, now)
    default_silence = res.settings.jobs.default_max_silence_s
    devices = await res.pool.fetch(_DEVICES, end, device_ids)
    if not devices:
        return []
    store = report_store(res)
    silences = {
        d["id"]: default_silence if d["max_silence_s"] is None else d["max_silence_s"] for d in devices
    }
    if store == "postgres":
        figures = await figures_from_sql(res, silences, start, effective_end)
    else:
        figures = await figures_from_reads(res, store, silences, start, effective_end)
    alerts = await res.docs.count_per_device("alerts", start, end)
    maintenance = await res.docs.count_per_device(
        "event_logs", start, end, time_field="timestamp", where={"event_type": MAINTENANCE_EVENT}
    )
    span_s = (effective_end - start).total_seconds()
    reports = []
    for device in devices:
        device_id = device["id"]
        up_s = figures.up_s.get(device_id, 0.0)
        metrics: dict[str, Any] = {
            "uptime_percentage": round(100.0 * up_s / span_s, 2) if span_s > 0 else None,
            "total_data_points": 0,
        }
        for label, count, mean in figures.series.get(device_id, []):
            metrics["total_data_points"] += count
            metrics[metric_name(label)] = mean
        metrics["alerts_triggered"] = alerts.get(device_id, 0)
        metrics["maintenance_events"] = maintenance.get(device_id, 0)
        reports.append(
            {
                "report_type": REPORT_TYPE,
                "device_id": device_id,
                "user_id": device["user_id"],
                "period": {"start": start, "end": end},
                "metrics": metrics,
                "store": store,  # which store the readings came from
                "generated_at": now,
            }
        )
    return reports


async def figures_from_sql(
    res: JobResources, silences: dict[int, int], start: datetime, end: datetime
) -> Figures:
    """PostgreSQL's `decoded_data`, aggregated by the server."""
    figures = Figures()
    ids = list(silences)
    if end > start:
        default = res.settings.jobs.default_max_silence_s
        rows = await res.pool.fetch(_UPTIME, start, end, default, ids)
        figures.up_s = {row["device_id"]: row["up_s"] for row in rows}
    for row in await res.pool.fetch(_AVERAGES, start, end, ids):
        figures.series.setdefault(row["device_id"], []).append((row["label"], row["n"], row["mean"]))
    return figures


async def figures_from_reads(
    res: JobResources, store: Store, silences: dict[int, int], start: datetime, end: datetime
) -> Figures:
    """Any store's readings, read a device at a time through the range reads and aggregated
    here by the rules of the SQL above. A text reading (Cassandra) counts as a sign of life
    for uptime but not as a data point, which are the numeric readings, as in PostgreSQL."""
    figures = Figures()
    if end <= start:
        return figures
    for device_id, silence_s in silences.items():
        allowed = timedelta(seconds=silence_s)
        rows = await _read_all(res, store, device_id, start - allowed, end)
        figures.up_s[device_id] = uptime_s(sorted({r.timestamp for r in rows}), allowed, start, end)
        series = _series(r for r in rows if r.timestamp >= start and r.text is None)
        if series:
            figures.series[device_id] = series
    return figures


async def _read_all(
    res: JobResources, store: Store, device_id: int, start: datetime, end: datetime
) -> list[Row]:
    rows: list[Row] = []
    page: str | None = None
    while True:
        found = await read_device(res, device_id, start, end, page_size=READ_PAGE, page=page, store=store)
        rows += found.rows
        if found.next is None:
            return rows
        page = found.next


def uptime_s(times: list[datetime], allowed: timedelta, start: datetime, end: datetime) -> float:
    """Seconds of [start, end) covered by readings at `times` (ascending, distinct), each up
    until `allowed` later, its next reading or `end`, whichever comes first."""
    total = 0.0
    for n, moment in enumerate(times):
        following = times[n + 1] if n + 1 < len(times) else end
        until = min(moment + allowed, following, end)
        total += max((until - max(moment, start)).total_seconds(), 0.0)
    return total


def _series(rows: Iterable[Row]) -> list[tuple[str, int, float | None]]:
    counts: dict[str, int] = {}
    values: dict[str, list[float]] = {}
    for row in rows:
        counts[row.measurement] = counts.get(row.measurement, 0) + 1
        if row.value is not None:
            values.setdefault(row.measurement, []).append(row.value)
    return [
        (label, count, sum(values[label]) / len(values[label]) if label in values else None)
        for label, count in counts.items()
    ]


async def store_reports(res: JobResources, reports: list[dict[str, Any]]) -> None:
    keyed = {report_key(r["device_id"], r["period"]["start"], r["period"]["end"]): r for r in reports}
    await res.docs.upsert_many(COLLECTION, keyed)
