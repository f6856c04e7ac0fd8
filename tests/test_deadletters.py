"""`iotflow deadletters list|show|replay|purge` against real PostgreSQL, Redis and Mosquitto:
a rejected message comes back once its cause is fixed, at its own receive time, once."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.records import AckToken, RawMessage
from worker.config import Settings
from worker.decode.codecs import builtin_codec_path, load_codecs
from worker.decode.decoder import Decoder, configured_codecs, decode_limits
from worker.decode.registry import DatapointBudget, DeviceRegistry
from worker.metrics import Metrics
from worker.runtime.mailbox import Mailbox
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.stores import open_stores
from worker.stores.dead_letters import topic_pattern

from .conftest import worker_env
from .helpers import Cli, iotflow_process, publish, running_daemon, wait_for, wait_for_count

RECEIVED = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)  # long before any replay
F2_TOPIC = "tele/f2-aabbccddee01/sensor-mode/climate/sensor-room1"  # a seeded F2 controller's


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(settings, monkeypatch, capsys)


async def reject(
    settings: Settings, messages: list[tuple[str, bytes]], received: datetime = RECEIVED
) -> None:
    """The daemon's decode and store of `messages`, received at `received`: each must become a
    dead letter (the daemon without its broker, so the receive time is the test's)."""
    async with open_stores(settings, pool_size=2) as stores:
        registry = DeviceRegistry(stores.postgres, None, stores.keys, False, DatapointBudget(100))
        decoder = Decoder(
            Mailbox(1), Mailbox(1), configured_codecs(settings), decode_limits(settings), registry, Metrics()
        )
        raw = [RawMessage(t, p, received.timestamp(), AckToken(0, n)) for n, (t, p) in enumerate(messages)]
        batch = await decoder.decode(raw)
        assert not batch.readings and len(batch.dead_letters) == len(messages), batch.dead_letters
        await PostgresTimeseriesWriter(stores).write(batch)


async def reasons(pg: asyncpg.Connection) -> list[str]:
    return [row["reason"] for row in await pg.fetch("SELECT reason FROM dead_letters ORDER BY id")]


async def readings(pg: asyncpg.Connection) -> list[tuple[datetime, str, float]]:
    rows = await pg.fetch(
        "SELECT r.timestamp, p.label, r.value FROM decoded_data r JOIN datapoints p ON p.id = r.datapoint_id "
        "ORDER BY r.timestamp, p.label"
    )
    return [(row["timestamp"], row["label"], row["value"]) for row in rows]


async def add_device(cli: Cli, key: str, *datapoints: str) -> None:
    """`iotflow devices add KEY --datapoint …` (the usual fix of an unknown device)."""
    argv = [word for point in datapoints for word in ("--datapoint", point)]
    code, _, err = await cli("devices", "add", key, *argv)
    assert (code, err) == (0, "")


async def usage_error(cli: Cli, problem: str, *argv: str) -> None:
    """argparse's exit 2 with its line, before anything is connected to."""
    with pytest.raises(SystemExit) as exited:
        await cli(*argv)
    assert exited.value.code == 2
    _, err = cli.output()
    assert problem in err, err


def f2_climate(temperature: float, at: datetime) -> bytes:
    frame = load_codecs()["climate"].encode(
        {"temperature": temperature, "humidity": 40.0, "pressure": 1013.0}
    )
    return orjson.dumps({"timestamp": at.isoformat(), "data": frame.hex()})


# --- replay: the cause fixed, the readings back -----------------------------------------------------


async def test_an_unknown_device_added_later_is_replayed_at_its_receive_time_once(
    cli: Cli, settings: Settings, pg: asyncpg.Connection
) -> None:
    await reject(settings, [("devices/boiler-9/telemetry", orjson.dumps({"temperature": 21.5}))])
    assert (await reasons(pg))[0] == "unknown_device: key boiler-9 is not in devices"
    await add_device(cli, "boiler-9", "temperature:°C")

    code, out, err = await cli("deadletters", "replay")
    assert (code, err) == (0, "")
    assert out == "replayed 1 dead letters (1 readings stored); still rejected 0; skipped as capped 0\n"
    # No time of its own: stored when it first arrived, not when it was replayed.
    assert await readings(pg) == [(RECEIVED, "temperature", 21.5)]
    assert await reasons(pg) == []

    code, out, _ = await cli("deadletters", "replay")
    assert code == 0 and out.startswith("replayed 0 dead letters (0 readings stored)")
    assert len(await readings(pg)) == 1


async def test_a_wrong_codec_label_fixed_in_the_codec_file_is_replayed(
    cli: Cli, settings: Settings, pg: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    codecs = tmp_path / "codecs.toml"
    codecs.write_text(builtin_codec_path().read_text().replace("[climate]", "[climat]"))
    settings.pipeline = replace(settings.pipeline, codecs=str(codecs))
    measured = RECEIVED - timedelta(seconds=5)
    await reject(settings, [(F2_TOPIC, f2_climate(21.5, measured))])
    assert (await reasons(pg))[0] == "unknown_codec: no codec for sensor mode 'climate'"

    monkeypatch.setenv("IOTFLOW_PIPELINE_CODECS", str(codecs))
    assert (await cli("deadletters", "replay"))[0] == 0
    assert await reasons(pg) == ["unknown_codec: no codec for sensor mode 'climate'"]  # not fixed yet
    codecs.write_text(builtin_codec_path().read_text())
    code, out, _ = await cli("deadletters", "replay")
    assert code == 0 and out.startswith("replayed 1 dead letters (3 readings stored)")
    assert await readings(pg) == [
        (measured, "room1.humidity", 40.0),
        (measured, "room1.pressure", 1013.0),
        (measured, "room1.temperature", 21.5),
    ]
    assert await reasons(pg) == []


async def test_an_out_of_range_reading_is_replayed_once_the_range_is_wider(
    cli: Cli, settings: Settings, pg: asyncpg.Connection
) -> None:
    await add_device(cli, "oven-1", "temperature:°C:-40:85")
    await reject(settings, [("devices/oven-1/telemetry", orjson.dumps({"temperature": 120}))])
    before = await reasons(pg)
    assert before[0].startswith("out_of_range: temperature=120 outside [-40, 85]")

    code, out, _ = await cli("deadletters", "replay")
    assert code == 0 and out.endswith("still rejected 1 (out_of_range 1); skipped as capped 0\n")
    assert await reasons(pg) == before and await readings(pg) == []

    await pg.execute("UPDATE datapoints SET max_value = 250 WHERE label = 'temperature'")
    code, out, _ = await cli("deadletters", "replay", "--reason", "out_of_range")
    assert code == 0 and out.startswith("replayed 1 dead letters (1 readings stored); still rejected 0")
    assert await readings(pg) == [(RECEIVED, "temperature", 120.0)]


async def test_a_dead_letter_still_rejected_takes_its_new_reason(
    cli: Cli, settings: Settings, pg: asyncpg.Connection
) -> None:
    await reject(settings, [("devices/tank-1/telemetry", orjson.dumps({"level": 1e9}))])
    first = await pg.fetchrow("SELECT * FROM dead_letters")
    assert first["reason"].startswith("unknown_device")
    await add_device(cli, "tank-1", "level:%:0:100")
    code, out, _ = await cli("deadletters", "replay")
    assert code == 0 and "still rejected 1 (out_of_range 1)" in out
    again = await pg.fetchrow("SELECT * FROM dead_letters")
    device = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'tank-1'")
    assert again["reason"] == f"out_of_range: level=1000000000 outside [0, 100] on device {device}"
    assert again["reason_size"] == len(again["reason"])
    keep = ("id", "fingerprint", "received_at", "last_received_at", "occurrences", "payload")
    assert [again[k] for k in keep] == [first[k] for k in keep]


async def test_a_capped_payload_is_never_replayed_and_keeps_its_reason(
    cli: Cli, settings: Settings, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.pipeline = replace(settings.pipeline, dead_letter_payload_bytes=16)
    payload = orjson.dumps({"temperature": 21.5, "humidity": 40})
    long_topic = f"devices/{'k' * 2000}/telemetry"  # kept up to 1,024 characters
    await reject(settings, [("devices/boiler-7/telemetry", payload), (long_topic, b"{}")])
    await add_device(cli, "boiler-7", "temperature", "humidity")
    before = await pg.fetch("SELECT * FROM dead_letters ORDER BY topic_size")

    code, out, _ = await cli("deadletters", "replay")
    assert code == 0
    assert out == "replayed 0 dead letters (0 readings stored); still rejected 0; skipped as capped 2\n"
    assert await pg.fetch("SELECT * FROM dead_letters ORDER BY topic_size") == before
    assert await readings(pg) == []
    code, out, _ = await cli("deadletters", "replay", "--dry-run")
    assert code == 0 and f"{before[0]['id']:>8}  devices/boiler-7/telemetry  -> skipped: capped" in out

    code, out, _ = await cli("deadletters", "show", str(before[0]["id"]))
    assert code == 0
    assert f"payload      {len(payload)} bytes, the first 16 kept (capped: never replayed)" in out
    code, out, _ = await cli("deadletters", "show", str(before[1]["id"]))
    assert code == 0 and f"(the first 1024 of {len(long_topic)} characters: capped, never replayed)" in out


async def test_a_dry_run_says_what_each_would_become_and_touches_nothing(
    cli: Cli, settings: Settings, pg: asyncpg.Connection
) -> None:
    await reject(
        settings,
        [
            ("devices/boiler-9/telemetry", orjson.dumps({"temperature": 21.5, "humidity": 40})),
            ("devices/nobody/telemetry", orjson.dumps({"temperature": 1})),
        ],
    )
    await add_device(cli, "boiler-9", "temperature", "humidity")

    async def everything() -> list[object]:
        return [
            await pg.fetch(f"SELECT * FROM {table} ORDER BY 1")
            for table in ("dead_letters", "decoded_data", "devices", "datapoints")
        ]

    before = await everything()
    code, out, err = await cli("deadletters", "replay", "--dry-run")
    assert (code, err) == (0, "")
    first, second = (row["id"] for row in before[0])
    assert out.splitlines() == [
        f"{first:>8}  devices/boiler-9/telemetry  -> 2 readings",
        f"{second:>8}  devices/nobody/telemetry  -> still rejected: unknown_device: key nobody is not in devices",
        "dry run: would replay 1 dead letters (2 readings); would stay rejected 1 (unknown_device 1); "
        "skipped as capped 0",
    ]
    assert await everything() == before


async def test_replay_runs_beside_the_daemon_ingesting(
    cli: Cli, settings: Settings, pg: asyncpg.Connection
) -> None:
    rejected = [
        (
            "devices/late-1/telemetry",
            orjson.dumps({"ts": 1_000 * (RECEIVED.timestamp() - n), "values": {"t": n}}),
        )
        for n in range(300)
    ]
    await reject(settings, rejected)
    await add_device(cli, "late-1", "t")
    now_ms = int(time.time() * 1000)
    live = [
        ("devices/sim-json-01/telemetry", orjson.dumps({"ts": now_ms - n, "values": {"temperature": n}}))
        for n in range(200)
    ]
    strangers = [("devices/nobody/telemetry", orjson.dumps({"temperature": n})) for n in range(50)]
    async with running_daemon(settings):
        publishing = asyncio.create_task(publish(settings.mqtt.url, [*live, *strangers]))
        code, out, _ = await cli("deadletters", "replay", "--batch-size", "25", "--topic", "devices/late-1/#")
        await publishing
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters WHERE topic LIKE '%nobody%'", 50)
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 500, timeout=30)
    assert code == 0 and out.startswith("replayed 300 dead letters (300 readings stored)")
    late = await pg.fetchval(
        "SELECT count(*) FROM decoded_data r JOIN devices d ON d.id = r.device_id WHERE d.device_key = 'late-1'"
    )
    assert late == 300
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 50


async def test_a_replay_killed_mid_way_completes_on_the_next_run_without_a_duplicate(
    cli: Cli, settings: Settings, pg: asyncpg.Connection
) -> None:
    total = 60
    await reject(
        settings,
        [
            (
                "devices/late-2/telemetry",
                orjson.dumps({"ts": 1_000 * (RECEIVED.timestamp() - n), "values": {"t": n}}),
            )
            for n in range(total)
        ],
    )
    await add_device(cli, "late-2", "t")
    ids = [row["id"] for row in await pg.fetch("SELECT id FROM dead_letters ORDER BY id")]
    # The second batch of ten waits on a row this test holds: the kill lands after the first commit.
    blocker = await asyncpg.connect(
        settings.postgres.url, server_settings={"search_path": settings.postgres.schema}
    )
    try:
        held = blocker.transaction()
        await held.start()
        await blocker.execute("SELECT 1 FROM dead_letters WHERE id = $1 FOR UPDATE", ids[15])
        async with iotflow_process(
            worker_env(settings), "deadletters", "replay", "--batch-size", "10"
        ) as replay:

            async def waiting() -> bool:
                return bool(
                    await pg.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'iotflow-deadletters' "
                        "AND wait_event_type = 'Lock'"
                    )
                )

            # Batches run one after the other: the second waiting means the first committed.
            await wait_for(waiting)
            assert await pg.fetchval("SELECT count(*) FROM dead_letters") == total - 10
            await replay.kill()
        await held.rollback()
    finally:
        await blocker.close()
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == total - 10
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 10

    code, out, _ = await cli("deadletters", "replay", "--batch-size", "10")
    assert code == 0 and out.startswith(f"replayed {total - 10} dead letters ({total - 10} readings stored)")
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == total
    assert await pg.fetchval("SELECT count(DISTINCT timestamp) FROM decoded_data") == total


async def test_a_malformed_codec_file_stops_a_replay_with_one_line_and_exit_2(
    cli: Cli, settings: Settings, pg: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await reject(settings, [("devices/nobody/telemetry", orjson.dumps({"t": 1}))])
    codecs = tmp_path / "codecs.toml"
    codecs.write_text("[climate]\nlength = 0\n")
    monkeypatch.setenv("IOTFLOW_PIPELINE_CODECS", str(codecs))
    code, out, err = await cli("deadletters", "replay")
    assert (code, out) == (2, "")
    assert (
        err
        == f"iotflow: configuration error: {codecs}: codec 'climate': `length` must be a positive integer\n"
    )
    assert len(await reasons(pg)) == 1


# --- list, show, purge ------------------------------------------------------------------------------


async def test_list_counts_per_reason_then_the_rows_filtered(
    cli: Cli, settings: Settings, pg: asyncpg.Connection
) -> None:
    await reject(
        settings,
        [
            ("devices/nobody/telemetry", orjson.dumps({"temperature": 1})),
            ("devices/nobody/telemetry", orjson.dumps({"temperature": 2})),
            ("devices/sim-json-01/telemetry", b"{broken"),
            ("tele/f2-aabbccddee01/sensor-mode/room9/sensor-x", b"\x00\x01\xfe"),
        ],
    )
    code, out, err = await cli("deadletters", "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:4] == [
        f"{'REASON':<24} {'HELD':>8}",
        f"{'unknown_device':<24} {2:>8}",
        f"{'bad_json':<24} {1:>8}",
        f"{'unknown_codec':<24} {1:>8}",
    ]
    assert lines[5].split() == ["ID", "REASON", "FIRST", "SEEN", "LAST", "SEEN", "COUNT", "TOPIC", "PAYLOAD"]
    assert len(lines) == 10
    assert any(line.endswith('devices/nobody/telemetry  {"temperature":2}') for line in lines)
    assert any(line.endswith("sensor-x  0x0001fe") for line in lines)

    code, out, _ = await cli("deadletters", "list", "--reason", "unknown_device", "--json")
    listed = orjson.loads(out)
    assert code == 0 and listed["reasons"] == {"unknown_device": 2}
    assert [d["payload_preview"] for d in listed["dead_letters"]] == [
        '{"temperature":2}',
        '{"temperature":1}',
    ]
    assert (
        listed["dead_letters"][0]["first_seen"] == RECEIVED.isoformat()
        and not listed["dead_letters"][0]["capped"]
    )

    code, out, _ = await cli("deadletters", "list", "--topic", "tele/#", "--json")
    assert code == 0 and orjson.loads(out)["reasons"] == {"unknown_codec": 1}
    code, out, _ = await cli("deadletters", "list", "--since", "-1h")
    assert (code, out) == (0, "no dead letters\n")
    await usage_error(cli, "invalid choice: 'misspelt'", "deadletters", "list", "--reason", "misspelt")


def test_a_preview_is_one_short_line_of_text_or_hex() -> None:
    from worker.cli.deadletters import preview

    assert preview(b'{"t": 1,\n "h": 2}') == '{"t": 1, "h": 2}'
    assert preview(b"x" * 100) == "x" * 39 + "…"
    assert preview("é".encode() * 31 + b"\xc3") == "é" * 31  # the stored head ends mid-character
    assert preview(b"\x00\x01\xfe") == "0x0001fe"


def test_a_topic_filter_reads_as_mqtt_says() -> None:
    import re

    def matches(topic_filter: str, topic: str) -> bool:
        return re.fullmatch(topic_pattern(topic_filter).strip("^$"), topic) is not None

    assert matches("devices/+/telemetry", "devices/a/telemetry")
    assert not matches("devices/+/telemetry", "devices/a/b/telemetry")
    assert matches("tele/#", "tele") and matches("tele/#", "tele/f2-x/sensor-mode/climate/sensor-a")
    assert not matches("tele/#", "telemetry/x") and matches("#", "anything/at/all")
    assert not matches("a.b/+", "axb/c")  # a dot is a dot


async def test_show_prints_the_whole_payload_as_text_or_hex(
    cli: Cli, settings: Settings, pg: asyncpg.Connection
) -> None:
    binary = bytes(range(20))
    await reject(
        settings,
        [("devices/nobody/telemetry", orjson.dumps({"temperature": 1})), ("devices/x/telemetry", binary)],
    )
    ids = {row["topic"]: row["id"] for row in await pg.fetch("SELECT id, topic FROM dead_letters")}
    text_id, binary_id = ids["devices/nobody/telemetry"], ids["devices/x/telemetry"]
    code, out, _ = await cli("deadletters", "show", str(text_id))
    assert code == 0
    assert out.splitlines() == [
        f"id           {text_id}",
        "topic        devices/nobody/telemetry",
        "reason       unknown_device: key nobody is not in devices",
        f"first seen   {RECEIVED:%Y-%m-%d %H:%M:%S}Z",
        f"last seen    {RECEIVED:%Y-%m-%d %H:%M:%S}Z",
        "occurrences  1",
        "payload      17 bytes",
        "",
        '{"temperature":1}',
    ]
    code, out, _ = await cli("deadletters", "show", str(binary_id))
    assert code == 0 and "payload      20 bytes, binary (hex)" in out
    assert out.splitlines()[-2:] == [
        "00000000  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  |................|",
        "00000010  10 11 12 13                                      |....|",
    ]
    code, out, _ = await cli("deadletters", "show", str(binary_id), "--json")
    shown = orjson.loads(out)
    assert code == 0 and shown["payload_hex"] == binary.hex() and shown["capped"] is False
    code, out, err = await cli("deadletters", "show", "999999")
    assert (code, out, err) == (2, "", "iotflow: deadletters show: no dead letter 999999\n")
    await usage_error(cli, "'x': must be a whole number from 1", "deadletters", "show", "x")


async def test_purge_drops_what_was_last_seen_before_a_time(
    cli: Cli, settings: Settings, pg: asyncpg.Connection
) -> None:
    old = RECEIVED - timedelta(days=3)
    await reject(settings, [("devices/nobody/telemetry", b"{broken"), ("devices/a/telemetry", b"{}")], old)
    await reject(settings, [("devices/nobody/telemetry", orjson.dumps({"t": 1}))], old)
    await reject(settings, [("devices/nobody/telemetry", orjson.dumps({"t": 2}))])
    code, out, _ = await cli("deadletters", "purge", "--before", "-2d", "--reason", "bad_json")
    assert (code, out.split("(")[-1]) == (0, "bad_json 1)\n") and out.startswith("purged 1 dead letters")
    code, out, _ = await cli("deadletters", "purge", "--before", "-2d")
    assert (
        code == 0
        and out.startswith("purged 2 dead letters")
        and out.endswith("(no_numeric_values 1, unknown_device 1)\n")
    )
    assert [r.split(":")[0] for r in await reasons(pg)] == ["unknown_device"]
    await usage_error(cli, "the following arguments are required: --before", "deadletters", "purge")


# --- /metrics -----------------------------------------------------------------------------------------


def _held(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "iotflow_dead_letters_held"
        for sample in family.samples
    }


async def test_metrics_hold_the_dead_letters_in_the_table_by_reason(
    settings: Settings, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.pipeline.DEAD_LETTERS_HELD_REFRESH_S", 0.05)
    settings.http = replace(settings.http, enabled=True, port=0)
    async with running_daemon(settings) as daemon:
        assert daemon.http is not None
        port = daemon.http.port
        await publish(
            settings.mqtt.url,
            [
                ("devices/nobody/telemetry", orjson.dumps({"t": 1})),
                ("devices/nobody/telemetry", orjson.dumps({"t": 2})),
                ("devices/nobody/telemetry", orjson.dumps({"t": 2})),  # the same: one row
                ("devices/x/telemetry", b"{broken"),
            ],
        )

        async def counted(expected: dict[str, float]) -> bool:
            return await asyncio.to_thread(_held, port) == expected

        await wait_for(lambda: counted({"unknown_device": 2.0, "bad_json": 1.0}))
        await pg.execute("DELETE FROM dead_letters WHERE reason LIKE 'bad_json%'")
        await wait_for(lambda: counted({"unknown_device": 2.0, "bad_json": 0.0}))


# --- the bench ----------------------------------------------------------------------------------------


async def test_the_replay_bench_stores_every_reading_it_counts(settings: Settings) -> None:
    from worker.tools.bench import deadletters as deadletters_bench

    result = await deadletters_bench.run(settings, 3000, 500)
    assert (result.dead_letters, result.readings) == (3000, 6000)
    assert result.rate > 0 and result.cpu_s > 0


# --- with Cassandra -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cassandra", "both"])
async def test_with_cassandra_the_readings_reach_every_readings_store_before_the_dead_letter_leaves(
    backend: str, cli: Cli, settings: Settings, pg: asyncpg.Connection, cassandra_hosts: str
) -> None:
    from worker.sinks.replay import replay_dead_letters
    from worker.stores.cassandra_schema import migrate_cassandra
    from worker.stores.dead_letters import Selection

    from .helpers import with_cassandra

    configured = with_cassandra(settings, cassandra_hosts, backend)
    payload = orjson.dumps({"temperature": 21.5, "state": "open"})
    await reject(configured, [("devices/boiler-9/telemetry", payload)])
    await add_device(cli, "boiler-9", "temperature", "state")
    device = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'boiler-9'")
    async with open_stores(configured) as stores:
        cassandra = stores.cassandra
        assert cassandra is not None
        await migrate_cassandra(cassandra)
        try:
            tally = await replay_dead_letters(stores, Selection())
            rows = await cassandra.execute(
                f"SELECT timestamp, measurement_name, numeric_value, text_value "
                f"FROM {configured.cassandra.keyspace}.device_data WHERE device_id = %s",
                [device],
            )
            stored = sorted(
                (r.timestamp.replace(tzinfo=UTC), r.measurement_name, r.numeric_value, r.text_value)
                for r in rows.current_rows
            )
        finally:
            await cassandra.execute(f"DROP KEYSPACE IF EXISTS {configured.cassandra.keyspace}")
    assert (tally.replayed, sum(tally.rejected.values())) == (1, 0)
    assert stored == [(RECEIVED, "state", None, "open"), (RECEIVED, "temperature", 21.5, None)]
    expected = [] if backend == "cassandra" else [(RECEIVED, "temperature", 21.5)]
    assert await readings(pg) == expected
    assert await pg.fetchval("SELECT last_seen FROM devices WHERE id = $1", device) == RECEIVED
    assert await reasons(pg) == []
