"""The daemon against a real Cassandra: MQTT to `device_data` in `cassandra` and `both` mode,
redelivery adding nothing, a kill -9 of the Cassandra node in both mode (PostgreSQL complete
meanwhile, the outbox replayed in order afterwards), Cassandra's rollups equal to
PostgreSQL's, and `iotflow query` paging through Cassandra (docs/storage.md).

The suite's own Cassandra node (tests/conftest.py), or the one IOTFLOW_TEST_CASSANDRA_HOSTS
names; the kill test always uses the suite's own. Each test works in a keyspace of its own,
dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from jobs.cassandra_rollups import CassandraRollups
from jobs.rollups import rollup_range
from schemas.records import DecodedBatch, Reading
from worker.config import Settings
from worker.sinks.cassandra import CassandraTimeseriesWriter
from worker.sinks.outbox import decode_batch
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.stores import open_stores
from worker.stores.cassandra import CassandraStore
from worker.stores.cassandra_schema import migrate_cassandra
from worker.tools.servers import CassandraServer

from .conftest import cassandra_worker_env
from .helpers import ROOT, publish, running_daemon, wait_for, wait_for_committed, with_cassandra
from .test_outages import BASE_MS, json_messages

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


@contextlib.asynccontextmanager
async def keyspace(settings: Settings) -> AsyncIterator[CassandraStore]:
    """The settings' keyspace, migrated, and a session on it; dropped afterwards."""
    store = CassandraStore(settings.cassandra)
    try:
        await migrate_cassandra(store)
        yield store
    finally:
        with contextlib.suppress(Exception):
            await store.execute(f"DROP KEYSPACE IF EXISTS {settings.cassandra.keyspace}")
        await store.close()


async def _device_id(pg: asyncpg.Connection) -> int:
    device_id: int = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'sim-json-01'")
    return device_id


async def _cassandra_readings(store: CassandraStore, device_id: int) -> list[tuple[int, float]]:
    """(milliseconds, value) of the device's `temperature` rows, oldest first."""
    result = await store.execute(
        f"SELECT timestamp, numeric_value FROM {store.settings.keyspace}.device_data WHERE device_id = %s "
        "AND measurement_name = 'temperature' ALLOW FILTERING",
        [device_id],
    )
    return sorted(
        (round(r.timestamp.replace(tzinfo=UTC).timestamp() * 1000), r.numeric_value) for r in result
    )


def _expected(count: int) -> list[tuple[int, float]]:
    return [(BASE_MS + n, float(n)) for n in range(count)]


async def _postgres_readings(pg: asyncpg.Connection) -> list[tuple[int, float]]:
    rows = await pg.fetch("SELECT timestamp, value FROM decoded_data")
    return sorted((round(r[0].timestamp() * 1000), r[1]) for r in rows)


async def _cassandra_reaches(store: CassandraStore, device_id: int, count: int, timeout: float) -> None:
    """Until the device has `count` temperature rows (reads failing meanwhile are retried)."""
    last: object = None

    async def probe() -> bool:
        nonlocal last
        try:
            last = len(await _cassandra_readings(store, device_id))
        except Exception as exc:  # the node is still coming back
            last = exc
            return False
        return last >= count

    try:
        await wait_for(probe, timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"Cassandra has {last!r} rows, expected {count}") from None


@pytest.mark.parametrize("backend", ["cassandra", "both"])
async def test_every_reading_through_mqtt_lands_in_cassandra_and_redelivery_adds_nothing(
    settings: Settings, pg: asyncpg.Connection, cassandra_hosts: str, private_dir: Path, backend: str
) -> None:
    configured = with_cassandra(settings, cassandra_hosts, backend, private_dir)
    async with keyspace(configured) as store, running_daemon(configured) as daemon:
        device_id = await _device_id(pg)
        await publish(settings.mqtt.url, json_messages(0, 150))
        await wait_for_committed(daemon, 150, timeout=60)
        assert await _cassandra_readings(store, device_id) == _expected(150)
        await publish(settings.mqtt.url, json_messages(0, 150))  # the same messages again
        await wait_for_committed(daemon, 300, timeout=60)
        assert await _cassandra_readings(store, device_id) == _expected(150)
        postgres = await _postgres_readings(pg)
        assert postgres == (_expected(150) if backend == "both" else [])
        user_id = await pg.fetchval("SELECT user_id FROM devices WHERE id = $1", device_id)
        ks = store.settings.keyspace
        in_user_data = await store.execute(
            f"SELECT count(*) FROM {ks}.user_data WHERE user_id = %s", [user_id]
        )
        assert in_user_data.current_rows[0][0] == 150
        ttl = await store.execute(
            f"SELECT TTL(numeric_value) FROM {ks}.device_data WHERE device_id = %s LIMIT 1", [device_id]
        )
        assert 0 < ttl.current_rows[0][0] <= configured.cassandra.default_ttl_s


async def _outbox_batches(pg: asyncpg.Connection) -> list[list[int]]:
    """The milliseconds of each batch in Cassandra's outbox, in id order."""
    rows = await pg.fetch("SELECT body FROM outbox WHERE store = 'cassandra' ORDER BY id")
    return [
        [round(r.timestamp.timestamp() * 1000) for r in decode_batch(row["body"]).readings] for row in rows
    ]


async def _write_times(store: CassandraStore, device_id: int) -> dict[int, int]:
    """WRITETIME (µs, the driver's client-side timestamp) of each temperature row, by milliseconds."""
    result = await store.execute(
        f"SELECT timestamp, WRITETIME(numeric_value) AS written FROM {store.settings.keyspace}.device_data "
        "WHERE device_id = %s AND measurement_name = 'temperature' ALLOW FILTERING",
        [device_id],
    )
    return {round(r.timestamp.replace(tzinfo=UTC).timestamp() * 1000): r.written for r in result}


async def test_both_mode_with_cassandra_killed_mid_stream_replays_the_outbox_in_order(
    settings: Settings, pg: asyncpg.Connection, cassandra_server: CassandraServer, private_dir: Path
) -> None:
    configured = with_cassandra(settings, cassandra_server.hosts, "both", private_dir)
    async with keyspace(configured):
        try:
            async with running_daemon(configured) as daemon:
                device_id = await _device_id(pg)
                await publish(settings.mqtt.url, json_messages(0, 100))
                await wait_for_committed(daemon, 100, timeout=60)
                # Killed while messages arrive, then more of them: the outage holds some for certain.
                await asyncio.gather(
                    publish(settings.mqtt.url, json_messages(100, 100)),
                    asyncio.to_thread(cassandra_server.kill),
                )
                await publish(settings.mqtt.url, json_messages(200, 200))
                await wait_for_committed(daemon, 400, timeout=60)  # acknowledged: in PostgreSQL + the outbox
                assert await _postgres_readings(pg) == _expected(400)  # complete during the outage
                held = await _outbox_batches(pg)
                assert held and set(range(BASE_MS + 200, BASE_MS + 400)) <= {
                    ms for batch in held for ms in batch
                }
                assert daemon.metrics.gauges["readings_stores_behind"]() == 1

                await asyncio.to_thread(cassandra_server.start)
                await wait_for(lambda: _outbox_empty(pg), timeout=90, interval=0.2)  # replayed
                # A new session: the test's own may still be waiting out its reconnection backoff.
                fresh = CassandraStore(configured.cassandra)
                try:
                    await _cassandra_reaches(fresh, device_id, 400, timeout=30)
                    assert await _cassandra_readings(fresh, device_id) == _expected(400)  # no duplicate
                    written = await _write_times(fresh, device_id)
                finally:
                    await fresh.close()
                assert await _postgres_readings(pg) == _expected(400)
                assert daemon.metrics.count("outbox_replayed", sink="cassandra") == len(held)
                # In order: each held batch was written after the one before it had been.
                spans = [
                    (min(written[ms] for ms in batch), max(written[ms] for ms in batch)) for batch in held
                ]
                assert all(before[1] < after[0] for before, after in itertools.pairwise(spans))
        finally:  # serving again for the rest of the suite (and to drop the keyspace)
            if cassandra_server.problem() is not None:
                await asyncio.to_thread(cassandra_server.start)


async def _outbox_empty(pg: asyncpg.Connection) -> bool:
    return not await pg.fetchval("SELECT count(*) FROM outbox")


def _irregular_batch(device_id: int, datapoints: dict[str, int]) -> DecodedBatch:
    """Three hours of readings at uneven times with uneven values, each datapoint its own."""
    rng = random.Random(7)
    readings = []
    for label, point in sorted(datapoints.items()):
        at = T0 + timedelta(seconds=rng.randrange(60))
        while at < T0 + timedelta(hours=3):
            readings.append(Reading(at, device_id, point, round(rng.uniform(-40, 60), 3), label))
            at += timedelta(seconds=rng.randrange(1, 120), milliseconds=rng.randrange(1000))
    return DecodedBatch(readings=readings, device_users={device_id: None})


async def test_cassandra_rollups_equal_the_postgres_rollups_of_the_same_readings(
    settings: Settings, pg: asyncpg.Connection, cassandra_hosts: str
) -> None:
    configured = with_cassandra(settings, cassandra_hosts, "both")
    device_id = await _device_id(pg)
    labels = await pg.fetch("SELECT label, id FROM datapoints WHERE device_id = $1", device_id)
    datapoints = {r["label"]: r["id"] for r in labels}
    batch = _irregular_batch(device_id, datapoints)
    async with keyspace(configured) as store, open_stores(configured) as stores:
        await PostgresTimeseriesWriter(stores).write(batch)
        await CassandraTimeseriesWriter(store).write(batch)
        end = T0 + timedelta(hours=3)
        postgres = await rollup_range(stores.postgres, T0, end)
        cassandra = await CassandraRollups(configured, stores.postgres, store).run_range(T0, end)
        assert cassandra.readings == postgres.readings == len(batch.readings)
        expected: dict[tuple[str, datetime, str], tuple[float, int]] = {}
        for table, suffix in (("rollup_hourly", "1h"), ("rollup_daily", "1d")):
            for row in await pg.fetch(
                f"SELECT r.*, d.label FROM {table} r JOIN datapoints d ON d.id = r.datapoint_id"
            ):
                for stat in ("count", "min", "max", "sum", "avg", "last"):
                    expected[(row["label"], row["bucket"], f"{stat}_{suffix}")] = (
                        float(row[stat]),
                        row["count"],
                    )
        found: dict[tuple[str, datetime, str], tuple[float, int]] = {}
        for label in datapoints:
            result = await store.execute(
                f"SELECT time_bucket, aggregation_type, value, count FROM {store.settings.keyspace}"
                ".aggregated_data WHERE device_id = %s AND measurement_name = %s",
                [device_id, label],
            )
            for r in result:
                found[(label, r.time_bucket.replace(tzinfo=UTC), r.aggregation_type)] = (r.value, r.count)
    assert len(expected) == 6 * len(datapoints) * (3 + 1)  # three hours and their day
    assert found.keys() == expected.keys()
    for key, (value, count) in expected.items():
        assert found[key] == (pytest.approx(value, rel=1e-12, abs=1e-9), count), key


async def _query(env: dict[str, str], *argv: str) -> tuple[list[dict[str, Any]], str]:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", "query", "device", *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    rows = [line for line in lines if "event" not in line]  # log lines (JSON) share stdout
    return rows, result.stderr.strip().splitlines()[-1]


async def test_iotflow_query_pages_through_a_device_range_on_cassandra(
    settings: Settings, pg: asyncpg.Connection, cassandra_hosts: str
) -> None:
    configured = with_cassandra(settings, cassandra_hosts, "cassandra")
    device_id = await _device_id(pg)
    readings = [
        Reading(T0 + timedelta(seconds=s), device_id, 0, float(s), label)
        for s in range(40)
        for label in ("humidity", "temperature")
    ]
    env = cassandra_worker_env(configured)
    span = [
        "--from",
        (T0 + timedelta(seconds=10)).isoformat(),
        "--to",
        (T0 + timedelta(seconds=35)).isoformat(),
    ]
    async with keyspace(configured) as store:
        await CassandraTimeseriesWriter(store).write(DecodedBatch(readings=readings, device_users={}))
        rows, summaries, page = [], [], None
        while True:
            got, summary = await _query(
                env, str(device_id), *span, "--page-size", "20", *(["--page", page] if page else [])
            )
            rows += got
            summaries.append(summary)
            page = next((part[5:] for part in summary.split() if part.startswith("next=")), None)
            if page is None:
                break
    assert len(summaries) == 3 and all(s.startswith("store=cassandra rows=") for s in summaries)
    assert [s.split()[1] for s in summaries] == ["rows=20", "rows=20", "rows=10"]
    stamps = [(r["timestamp"], r["measurement"]) for r in rows]
    assert len(set(stamps)) == len(stamps) == 50  # every row of the range once
    assert [r["timestamp"] for r in rows] == sorted((r["timestamp"] for r in rows), reverse=True)
    assert {r["value"] for r in rows} == {float(s) for s in range(10, 35)}
