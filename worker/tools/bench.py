"""`iotflow bench`: end-to-end throughput, latency and memory, against a raw ceiling.

One run, all separate processes, as in production: publishers (simulator
messages, F2 climate frames with three readings each, sent by
worker.tools.bench_publisher), Mosquitto, the worker
(`iotflow run`), PostgreSQL and Redis. It measures, in order:

1. the raw ceiling: a bare aiomqtt subscriber that only parses, fed the same load;
2. the worker: messages/s and readings/s from the first publish to the last
   commit, publish→commit latency p50/p99 (from the worker's /metrics), the
   worker's peak RSS (VmHWM), its CPU-seconds per 100k messages (/proc/PID/stat), and
   zero loss (rows counted in PostgreSQL);
3. the same with 10 alert rules per device, when the rules package provides them;
4. with --kafka, the Kafka paths (worker.tools.bench_kafka): the bridge's cost, Kafka
   intake with one and with two processes in a group.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from worker.config import Settings
from worker.logging import configure_logging
from worker.stores.migrate import migrate
from worker.stores.postgres import connect
from worker.stores.redis import delete_matching
from worker.tools.embedded import free_port
from worker.tools.simulate import build_fleet, register_fleet

READINGS_PER_MESSAGE = 3  # the climate codec: temperature, humidity, pressure


@dataclass
class RunResult:
    label: str
    messages: int
    seconds: float
    rows: int
    p50_s: float
    p99_s: float
    peak_rss_mb: float
    cpu_s: float = float("nan")  # the worker's user+system CPU from the first publish to the last commit

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_per_100k(self) -> float:
        return self.cpu_s * 100_000 / self.messages


def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    """PostgreSQL and Redis are the configured ones (or embedded with --embedded); the broker
    is always a Mosquitto of our own with the at-least-once settings of deploy/mosquitto.conf,
    since a stock one (max_queued_messages 1000) drops what a busy subscriber cannot take."""
    configure_logging("warning", "json")
    from worker.tools.embedded import EmbeddedServices

    with (
        tempfile.TemporaryDirectory(prefix="iotflow-bench-") as data_dir,
        EmbeddedServices(Path(data_dir), postgres=args.embedded, redis=args.embedded) as services,
    ):
        urls = services.start()
        if args.embedded:
            settings.postgres = replace(settings.postgres, url=urls.postgres_url)
            settings.redis = replace(settings.redis, url=urls.redis_url)
        settings.mqtt = replace(settings.mqtt, url=urls.mqtt_url)
        return _bench(settings, args)


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    stamp = int(time.time())
    settings.postgres = replace(settings.postgres, schema=f"bench_{stamp}")
    settings.redis = replace(settings.redis, key_prefix=f"bench:{stamp}:")
    messages, devices, publishers = args.messages, args.devices, args.publishers
    fleet = build_fleet(devices, "climate")

    async def prepare() -> None:
        await migrate(settings.postgres)
        await register_fleet(settings.postgres, fleet)

    asyncio.run(prepare())
    print(
        f"bench: {messages} messages × {READINGS_PER_MESSAGE} readings, {devices} devices, "
        f"{publishers} publisher processes, broker {settings.mqtt.url}",
        flush=True,
    )
    try:
        ceiling = _measure_ceiling(settings, messages, devices, publishers)
        print(f"raw ceiling (bare aiomqtt subscriber, parse only): {ceiling:,.0f} msg/s", flush=True)
        off = {"IOTFLOW_RULES_ENABLED": "false"}
        rules_env = _install_rules(settings, devices)  # rules off: the actor is disabled
        # Runs on this kind of machine vary by several percent: alternate off and on.
        floods_off, floods_on = [], []
        for n in range(1, args.repeat + 1):
            floods_off.append(
                _measure_worker(settings, messages, devices, publishers, f"flood, rules off #{n}", off)
            )
            if rules_env is not None:
                label = f"flood, 10 rules #{n}"
                floods_on.append(_measure_worker(settings, messages, devices, publishers, label, rules_env))
        # Latency means little while the broker holds a backlog: measure it at half the flood rate.
        paced = _mean_rate(floods_off) / 2
        paced_run = _measure_worker(
            settings, messages // 2, devices, publishers, f"{paced:,.0f}/s paced", off, paced
        )
        results = [*floods_off, paced_run, *floods_on]
        _report(results, ceiling)
        if floods_on:
            ratio = _mean_rate(floods_on) / _mean_rate(floods_off)
            print(f"\nrules on / rules off (mean flood rates): {ratio:.1%}")
        lost = [r for r in results if r.rows != r.messages * READINGS_PER_MESSAGE]
        if args.kafka:
            from worker.tools.bench_kafka import kafka_bench

            if not kafka_bench(settings, args, floods_off, stamp):
                return 1
        return 1 if lost else 0
    finally:
        asyncio.run(_drop(settings))


def _publishers(
    settings: Settings, messages: int, devices: int, count: int, rate: float = 0.0
) -> list[subprocess.Popen[bytes]]:
    """`count` publisher processes, each with its own slice of the fleet and of the messages."""
    procs = []
    for index in range(count):
        share = messages // count + (1 if index < messages % count else 0)
        first = index * devices // count
        slice_devices = (index + 1) * devices // count - first
        command = [
            "worker.tools.bench_publisher",
            settings.mqtt.url,
            str(share),
            str(slice_devices),
            str(first),
        ]
        command.append(str(rate / count))
        procs.append(subprocess.Popen([sys.executable, "-m", *command], stdout=subprocess.DEVNULL))
    return procs


def _measure_ceiling(settings: Settings, messages: int, devices: int, publishers: int) -> float:
    sub = subprocess.Popen(
        [sys.executable, "-m", "worker.tools.bench_ceiling", settings.mqtt.url, str(messages), "120"],
        stdout=subprocess.PIPE,
    )
    assert sub.stdout is not None
    if sub.stdout.readline().strip() != b"ready":
        raise RuntimeError("the ceiling subscriber did not start")
    for proc in _publishers(settings, messages, devices, publishers):
        proc.wait()
    result = orjson.loads(sub.stdout.readline())
    sub.wait()
    if result["received"] < messages:
        print(f"  (ceiling subscriber got {result['received']} of {messages}: the broker dropped some)")
    return float(result["rate"])


def _measure_worker(
    settings: Settings,
    messages: int,
    devices: int,
    publishers: int,
    label: str,
    extra_env: dict[str, str],
    rate: float = 0.0,
) -> RunResult:
    port = free_port()
    env = {
        **os.environ,
        "IOTFLOW_MQTT_URL": settings.mqtt.url,
        "IOTFLOW_MQTT_CLIENT_ID": f"iotflow-bench-{time.time_ns()}",
        "IOTFLOW_POSTGRES_URL": settings.postgres.url,
        "IOTFLOW_POSTGRES_SCHEMA": settings.postgres.schema,
        "IOTFLOW_REDIS_URL": settings.redis.url,
        "IOTFLOW_REDIS_KEY_PREFIX": settings.redis.key_prefix,
        "IOTFLOW_HTTP_PORT": str(port),
        "IOTFLOW_LOG_FORMAT": "json",
        **extra_env,
    }
    asyncio.run(_truncate(settings))
    worker = subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env, stdout=subprocess.PIPE)
    try:
        assert worker.stdout is not None
        for line in worker.stdout:
            if b'"supervisor.ready"' in line:
                break
        else:
            raise RuntimeError("the worker exited before it was ready")
        with contextlib.suppress(Exception):  # keep its stdout drained in the background
            _drain(worker)
        started, cpu_started = time.monotonic(), cpu_seconds(worker.pid)
        procs = _publishers(settings, messages, devices, publishers, rate)
        deadline = started + max(120.0, messages / 1000, 2 * messages / rate if rate else 0.0)
        metrics = _metrics(port)
        while metrics.get("iotflow_messages_committed_total", 0) < messages:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"{label}: committed {metrics.get('iotflow_messages_committed_total')}")
            time.sleep(0.05)
            metrics = _metrics(port)
        seconds, cpu = time.monotonic() - started, cpu_seconds(worker.pid) - cpu_started
        for proc in procs:
            proc.wait()
        peak_rss = _peak_rss_mb(worker.pid)
        rows = asyncio.run(_count_rows(settings))
        return RunResult(
            label,
            messages,
            seconds,
            rows,
            metrics['iotflow_commit_latency_quantile_seconds{quantile="0.5"}'],
            metrics['iotflow_commit_latency_quantile_seconds{quantile="0.99"}'],
            peak_rss,
            cpu,
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()


def _mean_rate(runs: list[RunResult]) -> float:
    return sum(r.rate for r in runs) / len(runs)


def _drain(proc: subprocess.Popen[bytes]) -> None:
    import threading

    def read() -> None:
        assert proc.stdout is not None
        for _ in proc.stdout:
            pass

    threading.Thread(target=read, daemon=True).start()


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a running process so far (/proc/PID/stat utime+stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _install_rules(settings: Settings, devices: int) -> dict[str, str] | None:
    """Ten rules per device through the rules package, when it is there; env to enable them."""
    try:
        from worker.tools.rules_bench import install_bench_rules
    except ImportError:
        return None

    async def install() -> None:
        conn = await connect(settings.postgres)
        try:
            ids = [row["id"] for row in await conn.fetch("SELECT id FROM devices ORDER BY id")]
        finally:
            await conn.close()
        await install_bench_rules(settings, ids, per_device=10)

    asyncio.run(install())
    return {"IOTFLOW_RULES_ENABLED": "true"}


async def _count_rows(settings: Settings) -> int:
    conn = await connect(settings.postgres)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM decoded_data"))
    finally:
        await conn.close()


async def _truncate(settings: Settings) -> None:
    conn = await connect(settings.postgres)
    try:
        await conn.execute("TRUNCATE decoded_data")
    finally:
        await conn.close()


async def _drop(settings: Settings) -> None:
    """Leave nothing behind: the run's schema and its Redis keys."""
    conn: asyncpg.Connection = await asyncpg.connect(settings.postgres.url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.postgres.schema}" CASCADE')
    finally:
        await conn.close()
    await delete_matching(settings.redis, f"{settings.redis.key_prefix}*")


def _report(results: list[RunResult], ceiling: float) -> None:
    rows: list[dict[str, Any]] = []
    print()
    print(f"{'run':<18} {'msg/s':>9} {'readings/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'peak RSS MB':>12} "
          f"{'CPU s/100k':>10} {'of ceiling':>10} {'loss':>6}")  # fmt: skip
    for r in results:
        loss = r.messages * READINGS_PER_MESSAGE - r.rows
        print(
            f"{r.label:<18} {r.rate:>9,.0f} {r.rate * READINGS_PER_MESSAGE:>11,.0f} {r.p50_s * 1000:>8.1f} "
            f"{r.p99_s * 1000:>8.1f} {r.peak_rss_mb:>12.1f} {r.cpu_per_100k:>10.1f} "
            f"{r.rate / ceiling:>10.0%} {loss:>6}"
        )
        rows.append({**r.__dict__, "rate": r.rate, "loss": loss, "ceiling": ceiling})
    print("\n" + orjson.dumps(rows).decode())
