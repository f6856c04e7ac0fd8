"""timeseries.backend against real PostgreSQL and Redis: which sinks the pipeline builds,
what PostgreSQL keeps when Cassandra holds the readings, text values through the decoder,
and `iotflow query device` on PostgreSQL with paging."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest

from schemas.records import AckToken, DeadLetter, DecodedBatch, RawMessage, Reading, Reason
from worker.config import Settings
from worker.decode.decoder import Decoder
from worker.decode.parse import Limits
from worker.decode.registry import DatapointBudget, DeviceRegistry
from worker.metrics import Metrics
from worker.pipeline import readings_sinks
from worker.runtime.mailbox import Mailbox
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.sinks.postgres_core import PostgresCoreWriter
from worker.stores import Stores, open_stores

from .test_rules_cli import Cli
from .test_rules_cli import cli as cli  # the fixture

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def _with_backend(settings: Settings, backend: str) -> Settings:
    return replace(settings, timeseries=replace(settings.timeseries, backend=backend))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("backend", "names", "kinds"),
    [
        ("postgres", ["postgres"], ["PostgresTimeseriesWriter"]),
        ("cassandra", ["cassandra", "postgres"], ["CassandraTimeseriesWriter", "PostgresCoreWriter"]),
        # Both: one sink writing both, with an outbox for the one that is down (docs/storage.md).
        ("both", ["postgres+cassandra"], ["MirroredReadings"]),
    ],
)
async def test_the_backend_chooses_the_readings_sinks(
    settings: Settings, backend: str, names: list[str], kinds: list[str]
) -> None:
    # Opening the stores never waits for Cassandra: the session connects on first use.
    async with open_stores(_with_backend(settings, backend)) as stores:
        assert (stores.cassandra is not None) == (backend != "postgres")
        sinks = readings_sinks(stores, Metrics())
        assert [s.name for s in sinks] == names
        assert [type(s).__name__ for s in sinks] == kinds


async def _device(pg: asyncpg.Connection, key: str) -> tuple[int, dict[str, int]]:
    device_id: int = await pg.fetchval("SELECT id FROM devices WHERE device_key = $1", key)
    rows = await pg.fetch("SELECT label, id FROM datapoints WHERE device_id = $1", device_id)
    return device_id, {r["label"]: r["id"] for r in rows}


def _dead_letter(payload: bytes) -> DeadLetter:
    return DeadLetter(
        topic="devices/x/telemetry",
        payload=payload,
        reason=Reason.BAD_JSON,
        detail="unexpected character",
        received_at=T0.timestamp(),
        fingerprint=payload.ljust(32, b"\0"),
        topic_size=19,
        reason_size=30,
    )


async def test_with_cassandra_postgres_keeps_dead_letters_and_last_seen_but_no_readings(
    stores: Stores, pg: asyncpg.Connection
) -> None:
    device_id, datapoints = await _device(pg, "sim-json-01")
    (label, datapoint_id), *_ = datapoints.items()
    seen = T0 + timedelta(minutes=5)
    batch = DecodedBatch(
        readings=[
            Reading(T0, device_id, datapoint_id, 1.0, label),
            Reading(seen, device_id, datapoint_id, 2.0, label),
        ],
        dead_letters=[_dead_letter(b"{oops")],
        messages=3,
    )
    sink = PostgresCoreWriter(stores)
    await sink.write(batch)
    await sink.write(batch)  # a redelivery: the dead letter counts twice, nothing else changes
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 0
    assert await pg.fetchval("SELECT occurrences FROM dead_letters") == 2
    assert await pg.fetchval("SELECT last_seen FROM devices WHERE id = $1", device_id) == seen


async def test_with_cassandra_on_text_values_reach_the_batch_as_texts(
    stores: Stores, pg: asyncpg.Connection
) -> None:
    device_id, _ = await _device(pg, "sim-json-02")
    payload = orjson.dumps({"temperature": 20.5, "door": "open", "alarm": True})
    raw = RawMessage("devices/sim-json-02/telemetry", payload, time.time(), AckToken(1, 1))

    async def decode(keep_text: bool) -> DecodedBatch:
        registry = DeviceRegistry(stores.postgres, None, stores.keys, True, DatapointBudget(20))
        out: Mailbox[DecodedBatch] = Mailbox(4)
        decoder = Decoder(Mailbox(4), out, {}, Limits(keep_text=keep_text), registry, Metrics())
        await decoder.handle([raw])
        (batch,) = await out.get_batch(1, 0)
        return batch

    kept = await decode(keep_text=True)
    assert [(r.label, r.value) for r in kept.readings] == [("temperature", 20.5)]
    assert sorted((t.label, t.text, t.device_id) for t in kept.texts) == [
        ("alarm", "true", device_id),
        ("door", "open", device_id),
    ]
    assert kept.dead_letters == []
    assert kept.device_users[device_id] == await pg.fetchval(
        "SELECT user_id FROM devices WHERE id = $1", device_id
    )

    without = await decode(keep_text=False)
    assert without.texts == [] and len(without.readings) == 1
    (letter,) = without.dead_letters
    assert letter.reason is Reason.SKIPPED_FIELDS and "door" in letter.detail


async def _store_readings(stores: Stores, pg: asyncpg.Connection, count: int) -> tuple[int, dict[str, int]]:
    device_id, datapoints = await _device(pg, "sim-json-03")
    readings = [
        Reading(T0 + timedelta(seconds=i), device_id, datapoint_id, float(i), label)
        for i in range(count)
        for label, datapoint_id in sorted(datapoints.items())
    ]
    await PostgresTimeseriesWriter(stores).write(DecodedBatch(readings=readings))
    return device_id, datapoints


async def test_query_pages_through_a_device_s_range_on_postgres(
    stores: Stores, pg: asyncpg.Connection, cli: Cli
) -> None:
    device_id, datapoints = await _store_readings(stores, pg, 10)
    start, end = T0.isoformat(), (T0 + timedelta(seconds=8)).isoformat()  # seconds 0..7
    expected = 8 * len(datapoints)
    rows: list[dict[str, object]] = []
    page: list[str] = []
    pages = 0
    while True:
        code, out, err = await cli(
            "query", "device", str(device_id), "--from", start, "--to", end, "--page-size", "5", *page
        )
        assert code == 0, err
        pages += 1
        summary = err.strip().splitlines()[-1]
        assert summary.startswith("store=postgres rows=")
        rows += [orjson.loads(line) for line in out.splitlines()]
        token = [word for word in summary.split() if word.startswith("next=")]
        if not token:
            break
        page = ["--page", token[0].removeprefix("next=")]
    assert len(rows) == expected and pages == -(-expected // 5)
    stamps = [datetime.fromisoformat(str(r["timestamp"])) for r in rows]
    assert stamps == sorted(stamps, reverse=True)  # newest first, across pages
    assert len({(r["timestamp"], r["measurement"]) for r in rows}) == expected  # no row twice

    label = sorted(datapoints)[0]
    code, out, err = await cli(
        "query", "device", str(device_id), "--from", start, "--to", end, "--measurement", label
    )
    assert code == 0
    values = [orjson.loads(line)["value"] for line in out.splitlines()]
    assert values == [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert "store=postgres rows=8 " in err and "next=" not in err


async def test_query_refuses_what_it_cannot_answer_with_exit_2(
    stores: Stores, pg: asyncpg.Connection, cli: Cli
) -> None:
    device_id, _ = await _store_readings(stores, pg, 1)
    base = (
        "query",
        "device",
        str(device_id),
        "--from",
        T0.isoformat(),
        "--to",
        (T0 + timedelta(hours=1)).isoformat(),
    )
    code, _, err = await cli(*base, "--store", "cassandra")
    assert code == 2 and "no Cassandra" in err and err.count("\n") == 1
    code, _, err = await cli(*base, "--page", "zz:nothing")
    assert code == 2 and "not a page token" in err
    code, _, err = await cli(
        "query", "device", str(device_id), "--from", T0.isoformat(), "--to", T0.isoformat()
    )
    assert code == 2 and "--to must be later" in err


async def test_with_cassandra_the_only_store_the_daemon_waits_for_it(settings: Settings) -> None:
    """A durable role: no READY, no intake, until Cassandra answers; the driver adds no lines."""
    from .helpers import worker_process
    from .test_cassandra import refusing_port

    with refusing_port() as port:
        async with worker_process(
            settings, IOTFLOW_TIMESERIES_BACKEND="cassandra", IOTFLOW_CASSANDRA_PORT=str(port)
        ) as worker:
            first = await worker.wait_for_event("stores.waiting")
            assert "NoHostAvailable" in first["error"] and "Connection refused" in first["error"]
            assert await worker.terminate() == 0
    events = worker.events()
    assert "supervisor.ready" not in events and "stores.waiting" in events
    assert not [r for r in worker.records() if str(r.get("logger", "")).startswith("cassandra")]


async def test_migrate_with_cassandra_unreachable_exits_1_with_one_line(settings: Settings) -> None:
    from .conftest import worker_env
    from .helpers import iotflow_process
    from .test_cassandra import refusing_port

    with refusing_port() as port:
        env = {
            **worker_env(settings),
            "IOTFLOW_TIMESERIES_BACKEND": "both",
            "IOTFLOW_CASSANDRA_PORT": str(port),
        }
        async with iotflow_process(env, "migrate") as migrate:
            assert await migrate.wait() == 1
    errors = [r for r in migrate.records() if r.get("level") == "error"]
    assert [r["event"] for r in errors] == ["cassandra.unavailable"]
    assert "Traceback" not in migrate.output


@pytest.mark.parametrize(("backend", "waits"), [("postgres", True), ("cassandra", False)])
async def test_raw_retention_is_cassandra_s_ttl_when_it_holds_the_readings(
    settings: Settings, backend: str, waits: bool
) -> None:
    import structlog

    from jobs.context import open_resources
    from jobs.retention import apply_retention

    async with open_resources(_with_backend(settings, backend)) as res:
        with structlog.testing.capture_logs() as logs:
            await apply_retention(res, datetime.now(UTC))
    # No rollup has run: PostgreSQL's raw retention holds back and says so; with Cassandra
    # holding the readings there is nothing in decoded_data to hold back.
    assert ("retention.raw_waits" in [e["event"] for e in logs]) is waits
