"""`iotflow bench --http`: the HTTP intake beside the MQTT path, in one run.

Everything in separate processes, as in production: client processes
(worker.tools.bench.http_client) post JSON telemetry over keep-alive connections to a new
`iotflow run` with the device API on, for each run; the MQTT floods are `iotflow bench`'s
own (support.measure_worker), alternated with the HTTP ones. Per run: requests/s,
readings/s, CPU-seconds per 100k readings of the daemon process alone (utime + stime
from /proc), peak RSS (VmHWM), the answers that were not 200, and the loss: readings
answered 200 that are not rows of `decoded_data`. Then one paced run per batch size at
half its flood rate, for the p99 of the clients' request latency (send to answer).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from typing import Any

import orjson

from worker.config import Settings
from worker.logging import configure_logging
from worker.stores.migrate import migrate
from worker.tools.bench.support import (
    READINGS_PER_MESSAGE,
    RunResult,
    bench_services,
    count_rows,
    cpu_seconds,
    daemon_env,
    drain,
    drop_run,
    mean_cpu,
    measure_worker,
    peak_rss_mb,
    runqueue_wait_s,
    truncate,
)
from worker.tools.embedded import free_port
from worker.tools.simulate import build_fleet, register_fleet

BATCHES = (1, 10)  # readings per request


@dataclass
class HttpRun:
    label: str
    requests: int
    readings: int  # accepted in 200 answers
    seconds: float
    cpu_s: float
    peak_rss_mb: float
    rows: int
    statuses: dict[str, int]
    latencies_ms: list[float]
    clients_cpu_s: float  # the client processes', for who limited the run
    waited_s: float  # the daemon runnable but waiting for a core (busy machine)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_per_100k(self) -> float:
        """CPU-seconds per 100k readings."""
        return self.cpu_s / max(self.readings, 1) * 100_000

    @property
    def loss(self) -> int:
        return self.readings - self.rows

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_http_bench(settings: Settings, args: argparse.Namespace) -> int:
    """PostgreSQL and Redis as `iotflow bench` has them (embedded with --embedded); a Mosquitto of its own."""
    configure_logging("warning", "json")
    with bench_services(settings, args.embedded):
        stamp = int(time.time())
        settings.postgres = replace(settings.postgres, schema=f"bench_{stamp}")
        settings.redis = replace(settings.redis, key_prefix=f"bench:{stamp}:")
        try:
            return _bench(settings, args)
        finally:
            asyncio.run(drop_run(settings))


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(_prepare(settings, args.devices))
    token = secrets.token_urlsafe(16)
    keys = _register(settings, token, args.devices)
    connections, clients = args.http_connections, args.publishers
    print(
        f"bench --http: {args.http_requests:,} requests per HTTP run "
        f"({', '.join(map(str, BATCHES))} readings each) over {connections:,} keep-alive connections "
        f"from {clients} client processes; MQTT floods of "
        f"{args.messages:,} messages × {READINGS_PER_MESSAGE} readings from {args.publishers} publishers; "
        f"{args.devices} devices per path, {len(os.sched_getaffinity(0))} usable cores shared by all",
        flush=True,
    )
    off = {"IOTFLOW_RULES_ENABLED": "false"}
    mqtt: list[RunResult] = []
    floods: dict[int, list[HttpRun]] = {}
    for n in range(1, args.repeat + 1):  # alternated: a busy neighbour hits every configuration
        mqtt.append(
            measure_worker(
                settings, args.messages, args.devices, args.publishers, f"mqtt flood #{n}", off, warm=True
            )
        )
        for batch in BATCHES:
            run = _http_run(
                settings,
                token,
                keys,
                batch,
                args.http_requests,
                connections,
                clients,
                0.0,
                f"http ×{batch} flood #{n}",
            )
            floods.setdefault(batch, []).append(run)
    paced = []
    for batch in BATCHES:
        rate = sum(r.rate for r in floods[batch]) / len(floods[batch]) / 2
        label = f"http ×{batch} paced {rate:,.0f}/s"
        paced.append(
            _http_run(
                settings, token, keys, batch, args.http_requests // 2, connections, clients, rate, label
            )
        )
    runs = [run for batch in BATCHES for run in floods[batch]] + paced
    _report(mqtt, runs)
    mqtt_cpu = mean_cpu(mqtt) / READINGS_PER_MESSAGE
    for batch in BATCHES:
        http_cpu = sum(r.cpu_per_100k for r in floods[batch]) / len(floods[batch])
        print(
            f"CPU-s per 100k readings, HTTP ×{batch} / MQTT: {http_cpu:.2f} / {mqtt_cpu:.2f} "
            f"= {http_cpu / mqtt_cpu:.2f}×"
        )
    lost = [r for r in runs if r.loss] + [r for r in mqtt if r.rows != r.messages * READINGS_PER_MESSAGE]
    return 1 if lost else 0


async def _prepare(settings: Settings, devices: int) -> None:
    await migrate(settings.postgres)
    await register_fleet(settings.postgres, build_fleet(devices, "climate"))  # the MQTT path's


def _daemon(settings: Settings, token: str) -> tuple[subprocess.Popen[bytes], int]:
    """A new `iotflow run` with the API on and rules off, ready; its HTTP port."""
    port = free_port()
    env = daemon_env(settings, port) | {
        "IOTFLOW_HTTP_API": "true",
        "IOTFLOW_HTTP_ADMIN_TOKENS": token,
        "IOTFLOW_RULES_ENABLED": "false",
    }
    daemon = subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env, stdout=subprocess.PIPE)
    assert daemon.stdout is not None
    for line in daemon.stdout:
        if b'"supervisor.ready"' in line:
            break
    else:
        raise RuntimeError("the worker exited before it was ready")
    drain(daemon)
    return daemon, port


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def _register(settings: Settings, token: str, devices: int) -> list[str]:
    """The HTTP fleet, registered through the API: their keys."""
    daemon, port = _daemon(settings, token)
    try:
        keys = []
        for index in range(devices):
            body = {"device_key": f"bench-http-{index}", "datapoints": [{"label": "temperature"}]}
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/v1/devices/register",
                data=orjson.dumps(body),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as answer:
                keys.append(orjson.loads(answer.read())["api_key"])
        return keys
    finally:
        _stop(daemon)


def _http_run(
    settings: Settings,
    token: str,
    keys: list[str],
    batch: int,
    requests: int,
    connections: int,
    clients: int,
    rate: float,
    label: str,
) -> HttpRun:
    asyncio.run(truncate(settings))
    daemon, port = _daemon(settings, token)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(clients):
            share = requests // clients + (1 if index < requests % clients else 0)
            mine = keys[index * len(keys) // clients : (index + 1) * len(keys) // clients]
            command = [str(port), str(connections // clients), str(share), str(batch), str(rate / clients)]
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.tools.bench.http_client", *command],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert proc.stdin is not None
            proc.stdin.write("".join(f"{key}\n" for key in mine).encode() + b"\n")
            proc.stdin.flush()
            procs.append(proc)
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError("an HTTP client did not start")
        rows_before = asyncio.run(count_rows(settings))  # the warm-up's
        client_pids = [proc.pid for proc in procs]
        cpu_before, clients_before = cpu_seconds([daemon.pid]), cpu_seconds(client_pids)
        waited_before = runqueue_wait_s([daemon.pid])
        started = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        results: list[dict[str, Any]] = []
        for proc in procs:
            assert proc.stdout is not None
            results.append(orjson.loads(proc.stdout.readline()))
        cpu, waited = cpu_seconds([daemon.pid]) - cpu_before, runqueue_wait_s([daemon.pid]) - waited_before
        clients_cpu = cpu_seconds(client_pids) - clients_before
        ended = max(result["last"] for result in results)
        statuses: dict[str, int] = {}
        for result in results:
            for code, n in result["statuses"].items():
                statuses[code] = statuses.get(code, 0) + n
        run = HttpRun(
            label,
            requests,
            sum(result["accepted"] for result in results),
            ended - started,
            cpu,
            peak_rss_mb(daemon.pid),
            asyncio.run(count_rows(settings)) - rows_before,
            statuses,
            [ms for result in results for ms in result["latencies_ms"]],
            clients_cpu,
            waited,
        )
        print(
            f"  {label}: {run.rate:,.0f} req/s, {run.readings / run.seconds:,.0f} readings/s, "
            f"{run.cpu_per_100k:.2f} CPU-s/100k readings, {run.peak_rss_mb:.0f} MB, answers {statuses}, "
            f"{run.loss} lost; in {run.seconds:.1f} s: daemon {cpu:.1f} CPU-s (waited for a core "
            f"{waited:.1f} s), clients {clients_cpu:.1f} CPU-s",
            flush=True,
        )
        return run
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        _stop(daemon)


def _report(mqtt: list[RunResult], runs: list[HttpRun]) -> None:
    print()
    print(f"{'run':<28} {'req/s':>8} {'readings/s':>10} {'CPU-s/100k rd':>13} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'peak RSS MB':>11} {'not 200':>7} {'loss':>5}")  # fmt: skip
    for m in mqtt:
        readings = m.messages * READINGS_PER_MESSAGE
        print(
            f"{m.label:<28} {m.rate:>8,.0f} {m.rate * READINGS_PER_MESSAGE:>10,.0f} "
            f"{m.cpu_per_100k / READINGS_PER_MESSAGE:>13.2f} {'—':>8} {'—':>8} {m.peak_rss_mb:>11.1f} "
            f"{'':>7} {readings - m.rows:>5}"
        )
    rows: list[dict[str, Any]] = []
    for r in runs:
        paced = "paced" in r.label
        p50, p99 = (f"{r.quantile_ms(q):>8.1f}" if paced else f"{'—':>8}" for q in (0.5, 0.99))
        refused = sum(n for code, n in r.statuses.items() if code != "200")
        print(
            f"{r.label:<28} {r.rate:>8,.0f} {r.readings / r.seconds:>10,.0f} {r.cpu_per_100k:>13.2f} "
            f"{p50} {p99} {r.peak_rss_mb:>11.1f} {refused:>7} {r.loss:>5}"
        )
        summary = {key: value for key, value in r.__dict__.items() if key != "latencies_ms"}
        rows.append(
            {
                **summary,
                "rate": r.rate,
                "cpu_per_100k_readings": r.cpu_per_100k,
                "p99_ms": r.quantile_ms(0.99),
            }
        )
    print("\n" + orjson.dumps(rows).decode())
