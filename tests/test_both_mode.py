"""The daemon in both mode with Cassandra unreachable: PostgreSQL gets everything, and the
outbox holds exactly what Cassandra missed, also across a kill -9 (docs/storage.md)."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import orjson
import pytest

from worker.api.probes import Readiness
from worker.config import Settings
from worker.sinks.outbox import decode_batch

from .helpers import running_daemon, wait_for, wait_for_committed, wait_for_count, worker_process
from .test_cassandra import black_hole, refusing_port
from .test_outages import json_messages, publish

Key = tuple[float, int, int, float]


def _both(settings: Settings, port: int, data_dir: Path) -> Settings:
    return replace(
        settings,
        timeseries=replace(settings.timeseries, backend="both"),
        cassandra=replace(settings.cassandra, port=port),
        storage=replace(settings.storage, data_dir=str(data_dir), write_timeout_s=1.0),
    )


async def _stored(pg: asyncpg.Connection) -> list[Key]:
    rows = await pg.fetch("SELECT timestamp, device_id, datapoint_id, value FROM decoded_data")
    return sorted((r[0].timestamp(), r[1], r[2], r[3]) for r in rows)


async def _in_outbox(pg: asyncpg.Connection, store: str) -> list[Key]:
    held = []
    for row in await pg.fetch("SELECT body FROM outbox WHERE store = $1 ORDER BY id", store):
        batch = decode_batch(row["body"])
        held += [(r.timestamp.timestamp(), r.device_id, r.datapoint_id, r.value) for r in batch.readings]
    return sorted(held)


@contextlib.contextmanager
def cassandra_away(kind: str) -> Iterator[int]:
    with refusing_port() if kind == "refused" else black_hole() as port:
        yield port


@pytest.mark.parametrize("outage", ["refused", "silent"])
async def test_with_cassandra_away_postgres_gets_everything_and_the_outbox_what_cassandra_missed(
    settings: Settings, pg: asyncpg.Connection, private_dir: Path, outage: str
) -> None:
    with cassandra_away(outage) as port:
        async with running_daemon(_both(settings, port, private_dir)) as daemon:
            await publish(settings.mqtt.url, json_messages(0, 120))
            await wait_for_committed(daemon, 120, timeout=60)  # acknowledged: in PostgreSQL + outbox
            stored = await _stored(pg)
            assert len(stored) == 120
            assert await _in_outbox(pg, "cassandra") == stored  # exactly what Cassandra missed
            assert daemon.metrics.gauges["outbox_backlog_batches"]() >= 1
            assert daemon.metrics.count("outbox_appended", sink="cassandra") >= 1


async def test_kill_9_of_the_daemon_during_a_cassandra_outage_loses_nothing_from_the_outbox(
    settings: Settings, pg: asyncpg.Connection, private_dir: Path
) -> None:
    with refusing_port() as port:
        env = {
            "IOTFLOW_TIMESERIES_BACKEND": "both",
            "IOTFLOW_CASSANDRA_PORT": str(port),
            "IOTFLOW_STORAGE_DATA_DIR": str(private_dir),
        }
        async with worker_process(settings, **env) as worker:
            await worker.wait_for_event("supervisor.ready")
            await publish(settings.mqtt.url, json_messages(0, 80))
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 80, timeout=60)

            async def all_held() -> bool:
                return len(await _in_outbox(pg, "cassandra")) >= 80

            await wait_for(all_held, timeout=60)
            await worker.wait_for_event("outbox.holding")
            await worker.kill()
        # Every reading PostgreSQL has is in Cassandra's outbox, whatever the kill interrupted:
        # the row commits before the ack, and a redelivery only adds a harmless second copy.
        stored = await _stored(pg)
        assert len(stored) == 80
        assert sorted(set(await _in_outbox(pg, "cassandra"))) == stored

        async with worker_process(settings, **env) as worker:  # the next run finds the backlog
            record = await worker.wait_for_event("outbox.holding")
            assert record["left_by"] == "an earlier run" and record["backlog"] >= 1
            assert await worker.terminate() == 0
        assert sorted(set(await _in_outbox(pg, "cassandra"))) == stored  # still held: Cassandra is away


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def test_with_cassandra_away_the_worker_is_ready_and_says_it_is_degraded(
    settings: Settings, pg: asyncpg.Connection, private_dir: Path
) -> None:
    """Ready means ingest flows and is acknowledged: in both mode a Cassandra outage is
    absorbed by the outbox, so /readyz says 200 with Cassandra degraded, not 503."""
    with refusing_port() as port:
        both = _both(settings, port, private_dir)
        both.http = replace(both.http, enabled=True, port=0)
        async with running_daemon(both) as daemon:
            await publish(settings.mqtt.url, json_messages(0, 30))
            await wait_for_committed(daemon, 30, timeout=60)
            assert daemon.http is not None
            status, body = await asyncio.to_thread(_get, daemon.http.port, "/readyz")
            _, metrics = await asyncio.to_thread(_get, daemon.http.port, "/metrics")
            stored = await pg.fetchval("SELECT count(*) FROM decoded_data")
    readiness = orjson.loads(body)
    assert status == 200, readiness
    assert readiness["ready"] is True and readiness["degraded"] == ["cassandra"]
    assert readiness["checks"]["cassandra"] is False and readiness["checks"]["postgres"] is True
    assert b"iotflow_readings_stores_behind 1.0" in metrics
    assert b"\niotflow_outbox_backlog_batches " in metrics  # both mode's other gauge (docs/operations.md)
    assert stored == 30


def test_in_both_mode_postgres_down_is_not_ready() -> None:
    """Cassandra is tolerated in both mode, PostgreSQL never: PostgreSQL down still makes /readyz 503."""
    readiness = Readiness(
        {"mqtt": True, "sinks": True, "postgres": False, "cassandra": True, "redis": True},
        frozenset({"cassandra"}),
    )
    assert not readiness.ready and readiness.degraded == []
    both_down = Readiness({"postgres": False, "cassandra": False}, frozenset({"cassandra"}))
    assert not both_down.ready and both_down.degraded == ["cassandra"]
