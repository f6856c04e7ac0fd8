"""The bench's own processes against the test broker: what the publishers send, the ceiling takes."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import asyncpg
import orjson

from worker.config import Settings
from worker.decode.codecs import load_codecs
from worker.decode.mappings import load_mappings
from worker.decode.parse import Limits, MessageParser
from worker.tools.bench import documents as documents_bench
from worker.tools.bench import notify as notify_bench
from worker.tools.bench.fleet import fleet_messages
from worker.tools.bench.mappings import FORMS, bench_mapping_file, form_stream
from worker.tools.bench.support import Publishers, children, cpu_seconds
from worker.tools.servers import AlertmanagerServer, FerretDBServer


def test_the_ceiling_takes_and_acknowledges_every_message_two_publishers_send(settings: Settings) -> None:
    total = 600  # below a stock Mosquitto's queue of 1000, should the ceiling lag
    command = ["worker.tools.bench.ceiling", settings.mqtt.url, str(total), "60"]
    ceiling = subprocess.Popen(
        [sys.executable, "-m", *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    publishers = None
    try:
        assert ceiling.stdout is not None and ceiling.stdin is not None
        assert ceiling.stdout.readline().strip() == b"ready"
        publishers = Publishers(settings, total, 8, 2)
        started = publishers.go()
        assert publishers.wait(started) > 0  # each waited for the broker's PUBACK of all it sent
        result = orjson.loads(ceiling.stdout.readline())
        assert result["received"] == total and result["last"] > started
        assert cpu_seconds([ceiling.pid]) > 0  # read while it waits for its stdin to end
        ceiling.stdin.close()
        assert ceiling.wait(30) == 0
    finally:
        if publishers is not None:
            publishers.kill()
        if ceiling.poll() is None:
            ceiling.kill()
            ceiling.wait()


def test_the_cpu_of_a_process_tree_comes_from_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in children(os.getpid())
        assert cpu_seconds([os.getpid()]) > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()


def _bench_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTFLOW_")}
    env.update(IOTFLOW_POSTGRES_URL=settings.postgres.url, IOTFLOW_POSTGRES_SCHEMA=settings.postgres.schema)
    return env


def test_bench_timeseries_both_without_cassandra_measures_the_outbox_beside_postgres(
    settings: Settings,
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            "bench",
            "--timeseries",
            "both",
            "--messages",
            "3000",
            "--repeat",
            "1",
        ],
        env=_bench_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "no Cassandra: it is down" in out
    for label in ("postgres #1", "both, cassandra down #1", "both, postgres down #1"):
        assert label in out
    assert "cost of 'both, cassandra down' (its outbox)" in out
    assert "cassandra #1" not in out.replace("both, cassandra down #1", "")  # no live Cassandra run
    assert "CPU-s/100k" in out
    assert asyncio.run(_schemas(settings, "bench_outbox_%")) == 0  # dropped


def test_bench_timeseries_cassandra_needs_a_cassandra_or_embedded(settings: Settings) -> None:
    """Without IOTFLOW_CASSANDRA_HOSTS and without --embedded there is nothing to measure
    (--embedded starts a Cassandra of the bench's own: measured in docs/performance.md, not here,
    where it would cost a minute of the suite)."""
    result = subprocess.run(
        [sys.executable, "-m", "worker", "bench", "--timeseries", "cassandra"],
        env=_bench_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "needs a Cassandra: set IOTFLOW_CASSANDRA_HOSTS or pass --embedded" in result.stdout


async def test_the_bench_rules_are_on_the_labels_its_traffic_carries(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    from worker.tools.bench.rules import install_bench_rules
    from worker.tools.simulate import build_fleet, register_fleet

    await register_fleet(settings.postgres, build_fleet(2, "climate"))
    ids = [row["id"] for row in await pg.fetch("SELECT id FROM devices ORDER BY id")]
    labels = ["room1.temperature", "room1.humidity", "room1.pressure"]
    assert await install_bench_rules(settings, ids, labels, per_device=10) == 10 * len(ids)
    docs = await pg.fetch("SELECT doc FROM documents WHERE collection = 'device_configs'")
    fields = {rule.get("field") for row in docs for rule in orjson.loads(row["doc"])["settings"]["alerts"]}
    assert fields == {None, *labels}  # None: the offline rule, which watches the whole device


def _services_env(settings: Settings) -> dict[str, str]:
    return {**_bench_env(settings), "IOTFLOW_REDIS_URL": settings.redis.url}


def test_bench_compare_fleet_floods_both_fleets_and_gives_their_ratio(settings: Settings) -> None:
    command = ["bench", "--messages", "400", "--devices", "4", "--compare-fleet", "40", "--repeat", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "worker", *command, "--no-rules"],
        env=_services_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = next(line for line in result.stdout.splitlines() if line.startswith('[{"label"'))
    runs = {row["label"]: row for row in orjson.loads(table)}
    assert runs["flood, rules off #1"]["loss"] == runs["40 dev, rules off #1"]["loss"] == 0
    assert "CPU-s per 100k messages, 40 devices / 4 (rules off): " in result.stdout
    assert asyncio.run(_schemas(settings, "bench_%")) == 0  # dropped


def test_bench_tls_floods_plain_and_tls_hops_and_gives_their_ratio(settings: Settings) -> None:
    """On servers of its own (Debian's PostgreSQL and redis-server, a Mosquitto with a TLS
    listener): every run writes every reading; the ratio is printed, not judged here."""
    command = ["bench", "--tls", "--messages", "400", "--devices", "4", "--repeat", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "worker", *command],
        env=_services_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "plain #1: " in result.stdout and "tls #1: " in result.stdout
    assert " 0 lost" in result.stdout.split("tls #1: ")[1]
    assert "TLS / plain " in result.stdout


def test_bench_http_stores_every_reading_answered_200_beside_the_mqtt_path(settings: Settings) -> None:
    command = ["bench", "--http", "--messages", "300", "--devices", "4", "--repeat", "1"]
    command += ["--http-requests", "200", "--http-connections", "20"]
    result = subprocess.run(
        [sys.executable, "-m", "worker", *command],
        env=_services_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = next(line for line in result.stdout.splitlines() if line.startswith('[{"label"'))
    runs = {row["label"]: row for row in orjson.loads(table)}
    assert runs["http ×10 flood #1"]["statuses"] == {"200": 200}
    assert runs["http ×10 flood #1"]["rows"] == runs["http ×10 flood #1"]["readings"] == 2000
    assert runs["http ×1 flood #1"]["rows"] == 200
    assert "CPU-s per 100k readings, HTTP ×10 / MQTT: " in result.stdout
    assert asyncio.run(_schemas(settings, "bench_%")) == 0  # dropped


def test_bench_compare_fleet_needs_a_registered_fleet(settings: Settings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "bench", "--compare-fleet", "40", "--first-contact"],
        env=_services_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--compare-fleet floods a registered fleet; drop --first-contact" in result.stderr


def test_the_fleet_bench_gives_each_fleet_devices_of_its_own() -> None:
    small, large = fleet_messages([4, 40], [8, 80])
    devices = [{message.topic.split("/")[1] for message in fleet} for fleet in (small, large)]
    assert [len(fleet) for fleet in (small, large)] == [8, 80]
    assert [len(names) for names in devices] == [4, 40]
    assert not devices[0] & devices[1]


def test_the_fleet_bench_times_each_stage_of_each_fleet(settings: Settings) -> None:
    command = ["--fleets", "4,40", "--messages", "400", "--batch", "100", "--rounds", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "worker.tools.bench.fleet", *command],
        env=_services_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for fleet in ("4", "40"):
        for round_ in (1, 2):
            assert f"round {round_}, {fleet:>7} devices: decode " in out
    means = out.split("mean of 2 rounds")[1].splitlines()[1:]
    assert [line.split()[0] for line in means] == ["4", "40"]
    assert all("rules " in line and "hot state " in line and line.endswith("×") for line in means)
    assert means[0].endswith("1.00×")
    assert asyncio.run(_schemas(settings, "fleet_bench_%")) == 0  # dropped


async def _schemas(settings: Settings, pattern: str) -> int:
    conn = await asyncpg.connect(settings.postgres.url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1", pattern)
        return count
    finally:
        await conn.close()


async def test_the_documents_bench_stores_every_document_it_counts(ferretdb_server: FerretDBServer) -> None:
    result = await documents_bench.run(ferretdb_server.url, 300, 40, ferretdb_server.pid)
    assert result.documents == 300 and result.seconds > 0
    assert result.server_cpu_s is not None and result.server_cpu_s >= 0
    line = result.line()
    assert line.startswith("documents=300 ") and "inserts_per_s=" in line and "server_cpu_s_per_100k=" in line


async def test_the_notify_bench_delivers_every_alert_of_the_storm_in_batches(
    settings: Settings, alertmanager_server: AlertmanagerServer
) -> None:
    settings.notify = replace(settings.notify, batch_size=40)
    runs = await notify_bench._bench(settings, 600, 100, 1, alertmanager_server.url)
    plain, notify = sorted(runs, key=lambda run: run.label)
    assert (plain.label, notify.label) == (notify_bench.PLAIN, notify_bench.NOTIFY)
    assert plain.messages == notify.messages == 600 and plain.delivered_s is None
    # The notify actor's first refresh may already see some of the storm's active alerts.
    assert notify.received is not None and notify.received >= 100 and notify.posts is not None
    assert sum(notify.posts) == notify.received and max(notify.posts) <= 40


def test_the_mappings_bench_forms_give_three_readings_each_at_times_of_their_own(tmp_path: Path) -> None:
    """What `iotflow bench --mappings` floods (its loss check wants messages × 3 rows: no
    two messages of a device may share a time, which would make a duplicate row)."""
    mappings = load_mappings([], [bench_mapping_file(tmp_path)])
    parser = MessageParser(load_codecs(), Limits(), mappings=mappings)
    now = time.time()
    for form in FORMS:
        seen: set[tuple[str, datetime]] = set()
        for topic, payload in itertools.islice(form_stream(form, 4, 8), 40):
            parsed = parser.parse(topic, payload, now)
            assert len(parsed.values) == 3 and parsed.device.value.startswith("bench-0000")
            seen.add((parsed.device.value, parsed.timestamps[0]))
        assert len(seen) == 40, form
