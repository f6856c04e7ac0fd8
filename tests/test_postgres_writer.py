"""The PostgreSQL writer copies timestamps as integer microseconds: they must come back exact."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import asyncpg

from schemas.records import DecodedBatch, Reading
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.stores import Stores


async def test_timestamps_are_stored_to_the_microsecond_whatever_their_zone(
    stores: Stores, pg: asyncpg.Connection
) -> None:
    device = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'sim-json-01'")
    point = await pg.fetchval(
        "SELECT id FROM datapoints WHERE device_id = $1 AND label = 'temperature'", device
    )
    now = datetime.now(UTC).replace(microsecond=0)
    stamps = [
        now - timedelta(minutes=3, microseconds=1),  # one microsecond off a whole second
        now - timedelta(minutes=2) + timedelta(microseconds=999_999),
        (now - timedelta(minutes=1, microseconds=456_789)).astimezone(timezone(timedelta(hours=-7))),
    ]
    batch = DecodedBatch(
        readings=[Reading(at, device, point, float(n), "temperature") for n, at in enumerate(stamps)]
    )
    writer = PostgresTimeseriesWriter(stores)
    assert await writer.write(batch) == 3
    assert await writer.write(batch) == 0  # the same instants again: duplicates, nothing added
    stored = await pg.fetch(
        "SELECT timestamp, value FROM decoded_data WHERE device_id = $1 AND datapoint_id = $2 ORDER BY value",
        device,
        point,
    )
    assert [(row["timestamp"], row["value"]) for row in stored] == [
        (at, float(n)) for n, at in enumerate(stamps)
    ]


async def test_last_seen_is_each_devices_newest_reading_to_the_microsecond(
    stores: Stores, pg: asyncpg.Connection
) -> None:
    """`devices.last_seen` also travels as microseconds; it never moves back."""
    rows = await pg.fetch(
        "SELECT d.id, p.id AS point FROM devices d JOIN datapoints p ON p.device_id = d.id "
        "WHERE d.device_key IN ('sim-json-01', 'sim-json-02') AND p.label = 'temperature' ORDER BY d.id"
    )
    (one, one_point), (two, two_point) = [(row["id"], row["point"]) for row in rows]
    newest = datetime.now(UTC).replace(microsecond=123_457) - timedelta(minutes=1)
    older = newest - timedelta(seconds=30, microseconds=1)
    zoned = newest.astimezone(timezone(timedelta(hours=5, minutes=30)))
    writer = PostgresTimeseriesWriter(stores)
    batch = [Reading(older, one, one_point, 1.0, "t"), Reading(newest, one, one_point, 2.0, "t")]
    await writer.write(DecodedBatch(readings=[*batch, Reading(zoned, two, two_point, 3.0, "t")]))
    seen = dict(await pg.fetch("SELECT id, last_seen FROM devices WHERE id = ANY($1)", [one, two]))
    assert seen == {one: newest, two: newest}
    await writer.write(DecodedBatch(readings=[Reading(older, two, two_point, 4.0, "t")]))  # a backlog
    assert await pg.fetchval("SELECT last_seen FROM devices WHERE id = $1", two) == newest
