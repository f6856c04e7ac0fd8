"""What `iotflow bench` and its Kafka part (worker.tools.bench.kafka) both measure with:
one run of `iotflow run` against publisher processes (`measure_worker`), its result
(`RunResult`), and the readings of /proc, /metrics and PostgreSQL it is made of.

Measuring only: what each bench runs and prints stays in pipeline.py and kafka.py.
Both import from here; kafka never imports pipeline (pipeline calls it for `--kafka`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
import orjson

from worker.config import Settings
from worker.stores.postgres import connect
from worker.stores.redis import delete_matching
from worker.tools.embedded import EmbeddedServices, free_port

__all__ = [
    "READINGS_PER_MESSAGE",
    "Publishers",
    "RunResult",
    "children",
    "count_rows",
    "cpu_seconds",
    "drain",
    "drop_run",
    "histogram_quantile",
    "mean_cpu",
    "mean_rate",
    "measure_worker",
    "parse_metrics",
    "peak_rss_mb",
    "runqueue_wait_s",
    "scrape_metrics",
    "truncate",
]

READINGS_PER_MESSAGE = 3  # the climate codec: temperature, humidity, pressure
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class RunResult:
    label: str
    messages: int
    seconds: float
    rows: int
    p50_s: float
    p99_s: float
    peak_rss_mb: float
    cpu_s: float = math.nan  # utime + stime of the worker's processes during the run
    publisher_rate: float = math.nan
    processes: int = 1
    # CPU-seconds during the run of everything the bench started: worker, publishers,
    # mosquitto, postgres, redis (the stores only with --embedded)
    cpu_by_role: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_per_100k(self) -> float:
        return self.cpu_s / self.messages * 100_000


class Publishers:
    """`count` publisher processes, each with its own slice of the fleet and of the messages;
    connected and waiting until `go`."""

    def __init__(
        self,
        settings: Settings,
        messages: int,
        devices: int,
        count: int,
        rate: float = 0.0,
        form: str = "climate",  # or a form of worker.tools.bench.mappings
    ) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        for index in range(count):
            share = messages // count + (1 if index < messages % count else 0)
            first = index * devices // count
            slice_devices = (index + 1) * devices // count - first
            command = [settings.mqtt.url, str(share), str(slice_devices), str(first), str(rate / count), form]
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker.tools.bench.publisher", *command],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        for proc in self.procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError("a publisher did not start")

    def go(self) -> float:
        """Start them all; the start time (monotonic, the same clock in every process)."""
        started = time.monotonic()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        return started

    def wait(self, started: float) -> float:
        """Once all are done: their aggregate send rate (all their messages, start to the last PUBACK)."""
        results = []
        for proc in self.procs:
            assert proc.stdout is not None
            results.append(orjson.loads(proc.stdout.readline()))
            proc.wait()
        finished = max(result["started"] + result["seconds"] for result in results)
        return sum(result["sent"] for result in results) / (finished - started)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def bench_services(settings: Settings, embedded: bool) -> Iterator[None]:
    """`settings` pointed, for the block, at a Mosquitto of the bench's own (with the
    at-least-once settings of deploy/mosquitto.conf: a stock one, max_queued_messages 1000,
    drops what a busy subscriber cannot take) and, with `embedded`, at an embedded PostgreSQL
    and Redis; else at the configured ones."""
    with (
        tempfile.TemporaryDirectory(prefix="iotflow-bench-") as data_dir,
        EmbeddedServices(Path(data_dir), postgres=embedded, redis=embedded) as services,
    ):
        urls = services.start()
        if embedded:
            settings.postgres = replace(settings.postgres, url=urls.postgres_url)
            settings.redis = replace(settings.redis, url=urls.redis_url)
        settings.mqtt = replace(settings.mqtt, url=urls.mqtt_url)
        yield


def daemon_env(settings: Settings, port: int) -> dict[str, str]:
    """The environment of a bench's `iotflow run`: these stores and broker, a client id of
    its own, its HTTP server on `port`, JSON logs (readiness is read from them)."""
    return {
        **os.environ,
        "IOTFLOW_MQTT_URL": settings.mqtt.url,
        "IOTFLOW_MQTT_CLIENT_ID": f"iotflow-bench-{time.time_ns()}",
        "IOTFLOW_POSTGRES_URL": settings.postgres.url,
        "IOTFLOW_POSTGRES_SCHEMA": settings.postgres.schema,
        "IOTFLOW_REDIS_URL": settings.redis.url,
        "IOTFLOW_REDIS_KEY_PREFIX": settings.redis.key_prefix,
        "IOTFLOW_HTTP_PORT": str(port),
        "IOTFLOW_LOG_FORMAT": "json",
    }


def measure_worker(
    settings: Settings,
    messages: int,
    devices: int,
    publishers: int,
    label: str,
    extra_env: dict[str, str],
    rate: float = 0.0,
    *,
    processes: int = 1,
    warm: bool = False,
    form: str = "climate",
) -> RunResult:
    """One run of `messages` against a new `iotflow run`. `warm`: first a message per device
    and process, not measured, so the run sees the fleet as a long-running daemon does (its
    caches hold the devices and their topics); else a process that meets its fleet during
    the run, as after a restart."""
    port = free_port()
    env = daemon_env(settings, port) | {"IOTFLOW_RUNTIME_PROCESSES": str(processes), **extra_env}
    if processes > 1:
        env["IOTFLOW_MQTT_SHARED_GROUP"] = f"bench{time.time_ns()}"
    asyncio.run(truncate(settings))
    worker = subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env, stdout=subprocess.PIPE)
    pubs = None
    try:
        assert worker.stdout is not None
        ready = b'"processes.ready"' if processes > 1 else b'"supervisor.ready"'
        for line in worker.stdout:
            if ready in line:
                break
        else:
            raise RuntimeError("the worker exited before it was ready")
        drain(worker)
        ports = [port + index for index in range(processes)]
        pids = [worker.pid, *children(worker.pid)]
        before = 0
        if warm:  # at the run's pace: a paced run's latency quantiles (since start) count these too
            # A shared group deals messages round robin: N per device let most reach every process.
            pubs = Publishers(settings, devices * processes, devices, publishers, rate, form)
            pubs.wait(pubs.go())
            before = _await_commits(ports, 0, devices * processes, worker, f"{label} (warm-up)")
        pubs = Publishers(settings, messages, devices, publishers, rate, form)
        roles = {pid: "worker" for pid in pids} | {proc.pid: "publishers" for proc in pubs.procs}
        by_role_before = _cpu_by_role(roles)
        cpu_before, waited_before = cpu_seconds(pids), runqueue_wait_s(pids)
        started = pubs.go()
        _await_commits(ports, before, messages, worker, label)
        seconds = time.monotonic() - started
        cpu = cpu_seconds(pids) - cpu_before
        by_role = _cpu_by_role(roles)
        cpu_by_role = {role: round(by_role[role] - by_role_before.get(role, 0.0), 2) for role in by_role}
        # Time the worker was runnable but not running: how much the machine, not the worker, held it back.
        cpu_by_role["worker runqueue wait"] = round(runqueue_wait_s(pids) - waited_before, 2)
        publisher_rate = pubs.wait(started)
        peak_rss = max(peak_rss_mb(pid) for pid in pids)
        scraped = [scrape_metrics(p) for p in ports]
        rows = asyncio.run(count_rows(settings)) - before * READINGS_PER_MESSAGE
        result = RunResult(
            label,
            messages,
            seconds,
            rows,
            max(histogram_quantile(0.5, m, "iotflow_commit_latency_seconds") for m in scraped),
            max(histogram_quantile(0.99, m, "iotflow_commit_latency_seconds") for m in scraped),
            peak_rss,
            cpu,
            publisher_rate,
            processes,
            cpu_by_role,
        )
        shares = ", ".join(f"{role} {value:.1f}" for role, value in sorted(cpu_by_role.items()))
        print(
            f"  {label}: {result.rate:,.0f} msg/s, {result.cpu_per_100k:.2f} CPU-s/100k, "
            f"publishers {publisher_rate:,.0f} msg/s, {messages * READINGS_PER_MESSAGE - rows} lost; "
            f"CPU-s in {seconds:.1f} s: {shares}",
            flush=True,
        )
        return result
    finally:
        if pubs is not None:
            pubs.kill()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _await_commits(
    ports: list[int], base: int, count: int, worker: subprocess.Popen[bytes], label: str
) -> int:
    """Wait until the worker has committed `count` messages more than `base`; its total."""
    deadline = time.monotonic() + max(300.0, count / 50)  # only a bound on a stuck run
    while (committed := _committed_total(ports) - base) < count:
        if time.monotonic() > deadline or worker.poll() is not None:
            raise RuntimeError(f"{label}: committed {committed:.0f} of {count}")
        # A scrape costs the worker CPU, which the run counts: poll often only near the end.
        time.sleep(0.02 if committed > count * 0.95 else 0.5)
    return base + int(committed)


def _committed_total(ports: list[int]) -> float:
    return sum(scrape_metrics(port).get("iotflow_messages_committed_total", 0.0) for port in ports)


def children(pid: int) -> list[int]:
    """The child processes of `pid` (the workers of `--processes N`)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _descendants(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for child in children(pid):
            found += [child, *_descendants(child)]
    return found


def _cpu_by_role(roles: dict[int, str]) -> dict[str, float]:
    """CPU-seconds so far of every process this bench started, by role: the given pids'
    roles, else the program's name (mosquitto, postgres, valkey-server as redis)."""
    totals: dict[str, float] = {}
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            role = roles.get(pid) or ("redis" if name.startswith(("valkey", "redis")) else name.split()[0])
            if role.startswith("postgres"):
                role = "postgres"
            if role in ("worker", "publishers", "postgres", "redis", "mosquitto"):
                totals[role] = totals.get(role, 0.0) + cpu_seconds([pid])
    return totals


def runqueue_wait_s(pids: list[int]) -> float:
    """Seconds the threads of these processes spent runnable, waiting for a core
    (the second field of /proc/PID/task/TID/schedstat)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes so far (fields 14 and 15 of /proc/PID/stat)."""
    total = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mean_rate(runs: list[RunResult]) -> float:
    return sum(r.rate for r in runs) / len(runs)


def mean_cpu(runs: list[RunResult]) -> float:
    return sum(r.cpu_per_100k for r in runs) / len(runs)


def drain(proc: subprocess.Popen[bytes]) -> None:
    """Keep its stdout read in the background, so its logging never blocks it."""

    def read() -> None:
        assert proc.stdout is not None
        for _ in proc.stdout:
            pass

    threading.Thread(target=read, daemon=True).start()


def scrape_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return parse_metrics(response.read().decode())


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as sample (`name{labels}` as written) → value."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def histogram_quantile(q: float, scraped: dict[str, float], name: str) -> float:
    """The `q` quantile of an unlabelled histogram in a scrape, interpolated within its
    bucket as Prometheus' histogram_quantile() does: what a dashboard would show."""
    prefix = f'{name}_bucket{{le="'
    edges = ((key[len(prefix) : -2], n) for key, n in scraped.items() if key.startswith(prefix))
    buckets = sorted((float(edge), n) for edge, n in edges)
    if not buckets or not buckets[-1][1]:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # past the last finite bucket: its edge is all that is known
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return math.nan  # unreachable: the +Inf bucket holds every observation


async def count_rows(settings: Settings) -> int:
    conn = await connect(settings.postgres)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM decoded_data"))
    finally:
        await conn.close()


async def truncate(settings: Settings) -> None:
    conn = await connect(settings.postgres)
    try:
        await conn.execute("TRUNCATE decoded_data")
    finally:
        await conn.close()


async def drop_run(settings: Settings) -> None:
    """Leave nothing behind: the run's schema and its Redis keys."""
    conn: asyncpg.Connection = await asyncpg.connect(settings.postgres.url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.postgres.schema}" CASCADE')
    finally:
        await conn.close()
    await delete_matching(settings.redis, f"{settings.redis.key_prefix}*")
