"""What a device, or an admin, reads: `GET /devices/{id}/status` (hot state, PostgreSQL and
the readings store while Redis is away) and `GET /telemetry/{id}` (the configured readings
store, newest first, paged with an opaque cursor). `{id}` is a device id, key or MAC."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from worker.api.errors import ApiError
from worker.retry import is_transient
from worker.sinks.hot_state import latest_through_reads
from worker.stores import Stores
from worker.stores.devices import UnknownDevice, find_device
from worker.stores.keys import LATEST_TTL_S
from worker.stores.timeseries import BadPageToken, NoCassandra, Store, read_device
from worker.times import EXAMPLES, parse_time

MAX_LIMIT = 1000


async def find(stores: Stores, ref: str) -> asyncpg.Record:
    try:
        return await find_device(stores.postgres, ref)
    except UnknownDevice as exc:
        raise ApiError(404, "unknown_device", str(exc)) from None


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment is not None else None


async def device_status(stores: Stores, device: asyncpg.Record) -> dict[str, Any]:
    device_id = int(device["id"])
    try:
        async with stores.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(stores.keys.device_status(device_id))
            pipe.hgetall(stores.keys.device_latest(device_id))
            status, latest = await pipe.execute()
    except Exception as exc:
        if not is_transient(exc):
            raise
        return await _status_without_redis(stores, device)
    last_seen = status.get(b"last_seen")
    return {
        "device_id": device_id,
        "online": status.get(b"is_online") == b"1",
        # The status entry lives 5 minutes; the writer keeps devices.last_seen for ever.
        "last_seen": last_seen.decode() if last_seen else _iso(device["last_seen"]),
        "latest": {label.decode(): float(value) for label, value in latest.items()},
    }


async def _status_without_redis(stores: Stores, device: asyncpg.Record) -> dict[str, Any]:
    """Redis away: PostgreSQL's last_seen and online flag, the latest values read from the
    readings store over the span hot state keeps them (10 minutes before last_seen)."""
    device_id, last_seen = int(device["id"]), device["last_seen"]
    latest: dict[str, float] = {}
    if last_seen is not None:
        store: Store = "cassandra" if stores.settings.timeseries.backend == "cassandra" else "postgres"
        since = last_seen - timedelta(seconds=LATEST_TTL_S)
        for reading in await latest_through_reads(stores, store)({device_id}, since):
            latest[reading.label] = reading.value
    online = await stores.postgres.fetchval("SELECT is_online FROM devices WHERE id = $1", device_id)
    return {"device_id": device_id, "online": bool(online), "last_seen": _iso(last_seen), "latest": latest}


def _moment(request: web.Request, name: str, default: str) -> datetime:
    text = request.query.get(name, default)
    if text.isdigit():  # epoch milliseconds
        try:
            return datetime.fromtimestamp(int(text) / 1000, UTC)
        except (OverflowError, ValueError, OSError):
            raise ApiError(400, "bad_query", f"{name}: {text} is out of range") from None
    try:
        return parse_time(text)
    except ValueError:
        raise ApiError(400, "bad_query", f"{name}: {text!r} is not a time ({EXAMPLES} or epoch ms)") from None


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", "100")
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise ApiError(400, "bad_query", f"limit: {text!r} is not a number from 1 to {MAX_LIMIT}")
    return int(text)


async def history(stores: Stores, device_id: int, request: web.Request) -> dict[str, Any]:
    start, end = _moment(request, "start", "-24h"), _moment(request, "end", "now")
    if end <= start:
        raise ApiError(400, "bad_query", "end must be later than start")
    limit = _limit(request)
    try:
        page = await read_device(
            stores,
            device_id,
            start,
            end,
            measurement=request.query.get("measurement") or None,
            page_size=limit,
            page=_page(request.query.get("cursor") or None),
        )
    except (BadPageToken, NoCassandra):
        raise ApiError(400, "bad_cursor", "cursor: not one this API gave") from None
    readings = []
    for row in page.rows:
        reading: dict[str, Any] = {"timestamp": _iso(row.timestamp), "measurement": row.measurement}
        reading["value"] = row.value
        if row.text is not None:
            reading["text"] = row.text
        readings.append(reading)
    cursor = base64.urlsafe_b64encode(page.next.encode()).decode().rstrip("=") if page.next else None
    return {"store": page.store, "readings": readings, "next_cursor": cursor}


def _page(cursor: str | None) -> str | None:
    """The store's page token inside a cursor: URL-safe, so it goes in a query as it is."""
    if cursor is None:
        return None
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_cursor", "cursor: not one this API gave") from None
