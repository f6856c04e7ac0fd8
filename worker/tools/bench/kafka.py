"""`iotflow bench --kafka`: the Kafka paths, in the same run as the MQTT path.

1. the bridge's cost: MQTT floods (rules off) with `kafka.bridge` on, every message to
   a raw topic and every reading to a processed topic, alternated with floods with the
   bridge off: rates, the worker's CPU-seconds per 100k messages and peak RSS of both;
   then one of each paced at half the bridge-off flood rate (half the messages), where
   peak RSS is the worker's own and not the MQTT backlog a flood builds up;
2. Kafka intake: the same messages, as raw envelopes (schemas/envelope.py), produced
   into a raw topic beforehand; a worker with `intake.source = kafka` drains them:
   records/s and readings/s from the first commit to the last, CPU-seconds per 100k
   records from the worker's readiness (its first fetch) to the last commit;
3. the same with two Kafka-intake processes in one consumer group.

With `--kafka-tls` the bridge floods of 1. alternate with a third kind, the bridge over
SASL_SSL (SCRAM-SHA-512, certificates from `iotflow certs`) to the same broker's secured
listener, and the bridge alone is measured over both: the CPU that TLS and the login add.

The broker is an Apache Kafka 4 KRaft node of the bench's own (worker.tools.servers,
in a temporary directory), unless `--kafka-bootstrap` names another; the bridge runs
with its defaults, the idempotent producer included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from schemas.envelope import device_key, raw_envelope
from schemas.records import AckToken, DecodedBatch, RawMessage, Reading
from worker.config import KafkaSettings, Settings
from worker.decode.codecs import load_codecs
from worker.stores.kafka import create_producer, create_topics
from worker.tools.bench.support import (
    READINGS_PER_MESSAGE,
    RunResult,
    count_rows,
    cpu_seconds,
    mean_rate,
    measure_worker,
    scrape_metrics,
    truncate,
)
from worker.tools.embedded import free_port
from worker.tools.servers import KafkaServer
from worker.tools.servers.kafka import KAFKA_VERSION
from worker.tools.servers.keystore import TlsIdentity, write_pkcs12
from worker.tools.simulate import build_fleet, message_stream


@dataclass
class IntakeResult:
    label: str
    records: int  # counted between the first and the last commit
    seconds: float
    rows: int
    expected_rows: int
    cpu_per_100k: float  # of every process, from its readiness to the last commit, over all records

    @property
    def rate(self) -> float:
        return self.records / self.seconds


def kafka_bench(
    settings: Settings, args: argparse.Namespace, floods_off: list[RunResult], stamp: int
) -> bool:
    """The three Kafka measurements; prints their table and the ratios to the MQTT floods
    (`floods_off`, and the bridge-off floods run here between the bridge-on ones).
    Whether every run wrote every reading."""
    secured: dict[str, str] = {}  # the bridge's settings for the SASL_SSL listener (--kafka-tls)
    with contextlib.ExitStack() as stack:
        bootstrap = args.kafka_bootstrap
        if not bootstrap:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="iotflow-kafka-")))
            tls, users = _secured_broker(directory) if args.kafka_tls else (None, {})
            # Kafka's default initial rebalance delay (the tests' node has none): two intake
            # processes started together join one rebalance, instead of the first one
            # draining the topic before the second holds a partition.
            server = KafkaServer(
                directory, properties={"group.initial.rebalance.delay.ms": "3000"}, tls=tls, users=users
            )
            bootstrap = stack.enter_context(server).bootstrap
            if tls is not None:
                ((user, password),) = users.items()
                secured = {
                    "IOTFLOW_KAFKA_BOOTSTRAP": server.sasl_ssl_bootstrap,
                    "IOTFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                    "IOTFLOW_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                    "IOTFLOW_KAFKA_USERNAME": user,
                    "IOTFLOW_KAFKA_PASSWORD": password,
                    "IOTFLOW_KAFKA_CA_FILE": str(tls.ca_file),
                }
        kafka = replace(settings.kafka, bootstrap=bootstrap, partitions=args.kafka_partitions)
        names = ("bridge-raw", "bridge-processed", "raw", "processed", "sink-raw", "sink-processed")
        topics = {name: f"bench-{name}-{stamp}" for name in names}
        asyncio.run(create_topics(kafka, list(topics.values())))
        broker = "given" if args.kafka_bootstrap else f"Kafka {KAFKA_VERSION}, KRaft, the bench's own"
        print(
            f"\nkafka: broker {bootstrap} ({broker}), {kafka.partitions} partitions per topic",
            flush=True,
        )
        sink_kafka = replace(kafka, raw_topic=topics["sink-raw"], processed_topic=topics["sink-processed"])
        sink_cpu = asyncio.run(_measure_sink(sink_kafka, args.messages, args.devices))
        print(
            f"kafka: the bridge alone, in-process: {sink_cpu * 1e6:.1f} µs CPU per message "
            f"(1 raw record + {READINGS_PER_MESSAGE} readings), {sink_cpu * 100_000:.2f} CPU-s per 100k",
            flush=True,
        )
        if secured:
            sink_tls = replace(
                sink_kafka,
                bootstrap=secured["IOTFLOW_KAFKA_BOOTSTRAP"],
                security_protocol="SASL_SSL",
                sasl_mechanism="SCRAM-SHA-512",
                username=secured["IOTFLOW_KAFKA_USERNAME"],
                password=secured["IOTFLOW_KAFKA_PASSWORD"],
                ca_file=secured["IOTFLOW_KAFKA_CA_FILE"],
            )
            tls_cpu = asyncio.run(_measure_sink(sink_tls, args.messages, args.devices))
            print(
                f"kafka: the bridge alone over SASL_SSL: {tls_cpu * 1e6:.1f} µs CPU per message, "
                f"{tls_cpu * 100_000:.2f} CPU-s per 100k ({tls_cpu / sink_cpu - 1:+.1%} on PLAINTEXT)",
                flush=True,
            )
        common = {"IOTFLOW_KAFKA_BOOTSTRAP": bootstrap, "IOTFLOW_RULES_ENABLED": "false"}
        bridge_env = {
            **common,
            "IOTFLOW_KAFKA_BRIDGE": "true",
            "IOTFLOW_KAFKA_RAW_TOPIC": topics["bridge-raw"],
            "IOTFLOW_KAFKA_PROCESSED_TOPIC": topics["bridge-processed"],
        }
        # The machine's speed drifts between runs: alternate bridge off and on.
        unbridged: list[RunResult] = []
        bridged: list[RunResult] = []
        bridged_tls: list[RunResult] = []
        kinds = [(unbridged, common, "off"), (bridged, bridge_env, "on")]
        if secured:
            kinds.append((bridged_tls, {**bridge_env, **secured}, "on, SASL_SSL"))
        for n in range(1, args.repeat + 1):
            for runs, env, label in kinds:
                runs.append(
                    measure_worker(
                        settings,
                        args.messages,
                        args.devices,
                        args.publishers,
                        f"MQTT, bridge {label} #{n}",
                        env,
                    )
                )
        # Peak RSS under a flood grows with the MQTT backlog (the publisher outruns the
        # worker); paced below the worker's rate it is the worker's own, comparable across
        # run lengths. Both at half the bridge-off flood rate, like the MQTT bench's paced run.
        rate = mean_rate(unbridged) / 2
        paced = [
            measure_worker(
                settings,
                args.messages // 2,
                args.devices,
                args.publishers,
                f"bridge {label}, {rate:,.0f}/s paced",
                env,
                rate,
            )
            for env, label in ((common, "off"), (bridge_env, "on"))
        ]
        produced = asyncio.run(_produce(bootstrap, topics["raw"], args.messages, args.devices))
        print(
            f"kafka: {args.messages} envelopes produced into {topics['raw']} at {produced:,.0f}/s", flush=True
        )
        intake_env = {
            **common,
            "IOTFLOW_INTAKE_SOURCE": "kafka",
            "IOTFLOW_KAFKA_RAW_TOPIC": topics["raw"],
            "IOTFLOW_KAFKA_PROCESSED_TOPIC": topics["processed"],
        }
        ones = [
            _measure_intake(settings, args.messages, intake_env, 1, f"Kafka intake, 1 process #{n}")
            for n in range(1, args.repeat + 1)
        ]
        twos = [
            _measure_intake(settings, args.messages, intake_env, 2, f"Kafka intake, 2 processes #{n}")
            for n in range(1, args.repeat + 1)
        ]
    _report(floods_off, unbridged, bridged, paced, ones, twos, bridged_tls)
    floods = [*unbridged, *bridged, *bridged_tls, *paced]
    whole = all(r.rows == r.messages * READINGS_PER_MESSAGE for r in floods)
    return whole and all(i.rows == i.expected_rows for i in [*ones, *twos])


def _secured_broker(directory: Path) -> tuple[TlsIdentity, dict[str, str]]:
    """A CA and the broker's certificate for 127.0.0.1, made by `iotflow certs` (its own
    process: the daemon's tooling does not import the CA's module), as a PKCS12 keystore;
    and a SCRAM user with a password of this run's."""
    certs = directory / "certs"
    for verb in (["init"], ["broker", "127.0.0.1"]):
        subprocess.run(
            [sys.executable, "-m", "worker", "certs", *verb, "--dir", str(certs)],
            check=True,
            capture_output=True,
        )
    keystore = write_pkcs12(certs / "server.crt", certs / "server.key", directory / "server.p12", "bench")
    return TlsIdentity(keystore, "bench", certs / "ca.crt"), {"iotflow-bench": secrets.token_urlsafe(16)}


def _envelopes(messages: int, devices: int) -> list[tuple[bytes, bytes]]:
    """The bench publisher's messages (one stream over the whole fleet), as raw envelopes."""
    stream = message_stream(build_fleet(devices, "climate"), load_codecs(), "climate")
    now = time.time()
    records = []
    for _ in range(messages):
        topic, payload = next(stream)
        records.append(
            (device_key(topic).encode(), raw_envelope(RawMessage(topic, payload, now, AckToken(0, 0))))
        )
    return records


async def _measure_sink(kafka: KafkaSettings, messages: int, devices: int) -> float:
    """The bridge alone, in this process: the bench publisher's messages and three
    readings each through `KafkaBridgeSink.write` in batches of 2,000 messages (the
    decoder's), against the broker. The process's CPU time per message (the broker's
    is its own process's, not counted), encoding and compression included."""
    from worker.sinks.kafka import KafkaBridgeSink

    stream = message_stream(build_fleet(devices, "climate"), load_codecs(), "climate")
    now, stamp = time.time(), datetime.now(UTC)
    batches = []
    for first in range(0, messages, 2000):
        batch = DecodedBatch()
        for n in range(first, min(first + 2000, messages)):
            topic, payload = next(stream)
            batch.raw.append(RawMessage(topic, payload, now, AckToken(0, n)))
            device = n % devices + 1
            batch.readings.extend(Reading(stamp, device, point, 21.5, "x") for point in (1, 2, 3))
        batch.messages = len(batch.raw)
        batches.append(batch)
    producer = create_producer(kafka)
    await producer.start()
    try:
        sink = KafkaBridgeSink(producer, kafka, raw=True)
        started = time.process_time()
        for batch in batches:
            await sink.write(batch)
        return (time.process_time() - started) / messages
    finally:
        await producer.stop()


async def _produce(bootstrap: str, topic: str, messages: int, devices: int) -> float:
    records = _envelopes(messages, devices)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=262144)
    await producer.start()
    try:
        started = time.monotonic()
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
        return messages / (time.monotonic() - started)
    finally:
        await producer.stop()


class _Worker:
    """One `iotflow run` whose JSON log is read in a thread for readiness and assignments."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.ready = threading.Event()
        self.partitions: set[int] = set()
        self.cpu_at_ready = 0.0
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env={**env, "IOTFLOW_HTTP_PORT": str(self.port)},
            stdout=subprocess.PIPE,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if b'"supervisor.ready"' in line:
                self.cpu_at_ready = cpu_seconds([self.process.pid])
                self.ready.set()
            elif b'"kafka.assigned"' in line or b'"kafka.revoked"' in line:
                with contextlib.suppress(orjson.JSONDecodeError, KeyError):
                    record = orjson.loads(line)
                    changed = set(record["partitions"])
                    if record["event"] == "kafka.assigned":
                        self.partitions = changed
                    else:
                        self.partitions -= changed

    def committed(self) -> float:
        return scrape_metrics(self.port).get("iotflow_messages_committed_total", 0.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _measure_intake(
    settings: Settings, messages: int, intake_env: dict[str, str], processes: int, label: str
) -> IntakeResult:
    """`processes` workers in a fresh group drain the topic. The clock starts at the first
    poll that sees every process holding partitions and something committed (so the
    initial rebalance of two processes is not counted) and stops at the last commit."""
    asyncio.run(truncate(settings))
    group = f"iotflow-bench-{time.time_ns()}"
    env = {
        **os.environ,
        "IOTFLOW_POSTGRES_URL": settings.postgres.url,
        "IOTFLOW_POSTGRES_SCHEMA": settings.postgres.schema,
        "IOTFLOW_REDIS_URL": settings.redis.url,
        "IOTFLOW_REDIS_KEY_PREFIX": settings.redis.key_prefix,
        "IOTFLOW_LOG_FORMAT": "json",
        "IOTFLOW_LOG_LEVEL": "info",
        "IOTFLOW_KAFKA_GROUP": group,
        **intake_env,
    }
    workers = [_Worker({**env, "IOTFLOW_KAFKA_CLIENT_ID": f"{group}-{n}"}) for n in range(processes)]
    try:
        deadline = time.monotonic() + max(120.0, messages / 500)
        for worker in workers:
            if not worker.ready.wait(max(1.0, deadline - time.monotonic())):
                raise RuntimeError(f"{label}: a worker did not get ready")
        start: tuple[float, float] | None = None
        while True:
            now = time.monotonic()
            total = sum(worker.committed() for worker in workers)
            if start is None and total > 0 and all(worker.partitions for worker in workers):
                start = (now, total)
            if total >= messages:
                break
            if now > deadline or any(worker.process.poll() is not None for worker in workers):
                raise RuntimeError(f"{label}: committed {total} of {messages}")
            time.sleep(0.05)
        if start is None or start[1] >= messages:
            raise RuntimeError(f"{label}: every record was committed before every process held partitions")
        # Over every record, from readiness (the first fetch): the window above would leave
        # out the work done on the records already in the pipeline when it opens.
        cpu = sum(cpu_seconds([worker.process.pid]) - worker.cpu_at_ready for worker in workers)
        rows = asyncio.run(count_rows(settings))
        return IntakeResult(
            label,
            int(messages - start[1]),
            now - start[0],
            rows,
            messages * READINGS_PER_MESSAGE,
            cpu * 100_000 / messages,
        )
    finally:
        for worker in workers:
            worker.stop()


def _report(
    floods_off: list[RunResult],
    unbridged: list[RunResult],
    bridged: list[RunResult],
    paced: list[RunResult],
    ones: list[IntakeResult],
    twos: list[IntakeResult],
    bridged_tls: list[RunResult],
) -> None:
    mqtt = mean_rate(floods_off)
    print(
        f"\n{'kafka run':<30} {'msg/s':>9} {'readings/s':>11} {'of MQTT flood':>14} "
        f"{'CPU s/100k':>11} {'peak RSS MB':>12} {'loss':>6}"
    )
    for r in [*unbridged, *bridged, *bridged_tls, *paced]:
        print(
            f"{r.label:<30} {r.rate:>9,.0f} {r.rate * READINGS_PER_MESSAGE:>11,.0f} {r.rate / mqtt:>14.0%} "
            f"{r.cpu_per_100k:>11.1f} {r.peak_rss_mb:>12.1f} {r.messages * READINGS_PER_MESSAGE - r.rows:>6}"
        )
    for i in [*ones, *twos]:
        print(
            f"{i.label:<30} {i.rate:>9,.0f} {i.rate * READINGS_PER_MESSAGE:>11,.0f} {i.rate / mqtt:>14.0%} "
            f"{i.cpu_per_100k:>11.1f} {'':>12} {i.expected_rows - i.rows:>6}"
        )
    one, two = sum(i.rate for i in ones) / len(ones), sum(i.rate for i in twos) / len(twos)
    off_cpu = sum(r.cpu_per_100k for r in unbridged) / len(unbridged)
    on_cpu = sum(r.cpu_per_100k for r in bridged) / len(bridged)
    print(f"\nMQTT flood, rules off, bridge off (mean of this run's {len(floods_off)}): {mqtt:,.0f} msg/s")
    print(
        f"bridge cost, rate: {1 - mean_rate(bridged) / mean_rate(unbridged):.1%} "
        f"(bridge-on floods against the bridge-off floods between them; target ≤ 20%)"
    )
    print(
        f"bridge cost, worker CPU in the floods: {on_cpu:.1f} against {off_cpu:.1f} CPU-s per 100k messages "
        f"({on_cpu / off_cpu - 1:+.1%})"
    )
    if bridged_tls:
        tls_cpu = sum(r.cpu_per_100k for r in bridged_tls) / len(bridged_tls)
        print(
            f"bridge over SASL_SSL, worker CPU in the floods: {tls_cpu:.1f} against {on_cpu:.1f} CPU-s per "
            f"100k messages over PLAINTEXT ({tls_cpu / on_cpu - 1:+.1%}; target ≤ 15%)"
        )
    paced_off, paced_on = paced
    print(
        f"bridge cost, worker CPU paced: {paced_on.cpu_per_100k:.1f} against {paced_off.cpu_per_100k:.1f} "
        f"CPU-s per 100k messages ({paced_on.cpu_per_100k / paced_off.cpu_per_100k - 1:+.1%}); "
        f"peak RSS {paced_on.peak_rss_mb:.0f} against {paced_off.peak_rss_mb:.0f} MB"
    )
    print(f"Kafka intake, 1 process / MQTT flood: {one / mqtt:.0%} (target ≥ 100%)")
    print(f"Kafka intake, 2 processes / 1 process: {two / one:.2f}× (target ≥ 1.5× where the cores allow)")
    print(f"cores: {os.cpu_count()} (shared by the broker, PostgreSQL, Redis, the publisher and the workers)")
    runs: list[RunResult | IntakeResult] = [*unbridged, *bridged, *bridged_tls, *paced, *ones, *twos]
    print(
        "\n"
        + orjson.dumps(
            [{**r.__dict__, "rate": r.rate, "cpu_per_100k": r.cpu_per_100k} for r in runs]
        ).decode()
    )
