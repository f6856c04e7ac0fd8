"""`python -m worker.tools.bench.notify`: an alert storm sent to Alertmanager beside ingest.

The writer's storage step in one process — the PostgreSQL readings sink and the alert
sink, as the daemon builds them — fed the same batches in two configurations,
alternated run by run:

- `alerts`: no notification channel (alerts stored and published on Redis only);
- `alerts + alertmanager`: the alert sink also fills the notification outbox, and the
  notify actor delivers from it to a real Alertmanager in the same event loop, as in
  the daemon.

Each run is `--messages` messages of three readings from `--devices` devices; the
batches that carry each device's first reading of the run also carry its fired alert:
every device breaches at once (the storm). Ingest is timed from the first batch to the
last one stored; delivery until the outbox holds nothing undelivered. The report gives
messages/s and CPU-seconds per 100,000 messages of this process for each configuration,
their ratio, and for the notify runs the time to deliver every alert and the POSTs
Alertmanager counted (its own /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from schemas.records import AlertEvent, DecodedBatch, Reading
from worker.config import Settings, load_settings
from worker.exit_codes import ExitCode
from worker.logging import configure_logging
from worker.metrics import Metrics
from worker.rules.events import alert_id
from worker.sinks.alerts import AlertSink
from worker.sinks.base import Sink
from worker.sinks.notify.channels import AlertmanagerChannel
from worker.sinks.notify.delivery import NotificationActor
from worker.sinks.notify.outbox import NotificationOutbox
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.stores import Stores, open_stores
from worker.stores.migrate import migrate
from worker.tools.bench.support import READINGS_PER_MESSAGE, cpu_seconds, parse_metrics
from worker.tools.servers import AlertmanagerServer, ServerUnavailable

BATCH_READINGS = 5000  # as the writer's batches under load (pipeline.batch_size)
PLAIN, NOTIFY = "alerts", "alerts + alertmanager"


@dataclass
class Run:
    label: str
    messages: int
    wall_s: float
    cpu_s: float
    started: float  # perf_counter
    servers_cpu_s: float | None  # PostgreSQL and the bench's own Alertmanager, while ingesting
    delivered_s: float | None = None  # notify runs: until every alert was delivered
    # Notify runs: alerts per POST /api/v2/alerts, and the alerts Alertmanager counted; both
    # include the actor's refresh at start, which may see some of the storm's first alerts.
    posts: list[int] | None = None
    received: float | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s

    @property
    def cpu_per_100k(self) -> float:
        return self.cpu_s * 100_000 / self.messages

    @property
    def servers_per_100k(self) -> float | None:
        return None if self.servers_cpu_s is None else self.servers_cpu_s * 100_000 / self.messages


def _batches(messages: int, devices: list[tuple[int, list[int]]], start: datetime) -> list[DecodedBatch]:
    """Batches of BATCH_READINGS readings; each device fires one alert with its first message."""
    per_batch = BATCH_READINGS // READINGS_PER_MESSAGE
    batches = []
    for first in range(0, messages, per_batch):
        batch = DecodedBatch(messages=min(per_batch, messages - first))
        for n in range(first, first + batch.messages):
            device, points = devices[n % len(devices)]
            at = start + timedelta(milliseconds=n)
            batch.readings += [Reading(at, device, p, 40.0, f"p{i}") for i, p in enumerate(points)]
            batch.device_users[device] = None
            if n < len(devices):
                batch.alerts.append(_fired(device, at))
        batches.append(batch)
    return batches


def _fired(device: int, at: datetime) -> AlertEvent:
    rule = f"device:{device}/storm"
    details = {"measurement": "p0", "value": 40.0, "threshold": 30.0, "unit": None}
    message = f"p0 on device {device} is 40, above the threshold of 30"
    return AlertEvent(
        "fired",
        alert_id(rule, device, at),
        rule,
        device,
        None,
        "threshold",
        "warning",
        message,
        at,
        at,
        details,
    )


async def _devices(pool: asyncpg.Pool, count: int) -> list[tuple[int, list[int]]]:
    ids = await pool.fetch(
        "INSERT INTO devices (device_key, name) SELECT k, k FROM unnest($1::text[]) AS t(k) RETURNING id",
        [f"bench-storm-{n}" for n in range(count)],
    )
    devices = [row["id"] for row in ids]
    rows = await pool.fetch(
        "INSERT INTO datapoints (device_id, label) SELECT d, l FROM unnest($1::int[], $2::text[]) AS t(d, l) "
        "RETURNING id, device_id, label",
        [d for d in devices for _ in range(READINGS_PER_MESSAGE)],
        [f"p{i}" for _ in devices for i in range(READINGS_PER_MESSAGE)],
    )
    points: dict[int, list[int]] = {}
    for row in sorted(rows, key=lambda r: (r["device_id"], r["label"])):
        points.setdefault(row["device_id"], []).append(row["id"])
    return [(d, points[d]) for d in devices]


def _alertmanager_received(url: str) -> float:
    """Alerts Alertmanager took through API v2 so far (its own /metrics)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        scraped = parse_metrics(answer.read().decode())
    return sum(
        value
        for name, value in scraped.items()
        if name.startswith("alertmanager_alerts_received_total{") and 'version="v2"' in name
    )


@contextlib.contextmanager
def _counting_posts() -> Iterator[list[int]]:
    """The size of each POST the Alertmanager channel makes, while the block runs (Alertmanager
    0.25 counts alerts, not requests)."""
    sizes: list[int] = []
    original = AlertmanagerChannel.post

    async def post(channel: AlertmanagerChannel, alerts: list[dict[str, Any]]) -> None:
        sizes.append(len(alerts))
        await original(channel, alerts)

    AlertmanagerChannel.post = post  # type: ignore[method-assign,assignment]
    try:
        yield sizes
    finally:
        AlertmanagerChannel.post = original  # type: ignore[method-assign]


async def _run(
    label: str, stores: Stores, batches: list[DecodedBatch], am_url: str, am_pid: int | None
) -> Run:
    pool = stores.postgres
    await pool.execute("TRUNCATE decoded_data, notification_outbox")
    await pool.execute("DELETE FROM documents WHERE collection IN ('alerts', 'event_logs')")
    notify = replace(stores.settings.notify, alertmanager_urls=[am_url] if label == NOTIFY else [])
    outbox = NotificationOutbox(pool, notify) if notify.enabled else None
    sinks: list[Sink] = [PostgresTimeseriesWriter(stores), AlertSink(stores, outbox)]
    actor = NotificationActor(stores, outbox, Metrics()) if outbox is not None else None
    task = asyncio.create_task(actor.run()) if actor is not None else None
    received_before = _alertmanager_received(am_url)
    with _counting_posts() as posts:
        run = await _timed(label, stores, sinks, batches, am_pid)
        if actor is not None and task is not None:
            undelivered = "SELECT count(*) FROM notification_outbox"
            while await pool.fetchval(undelivered):  # noqa: ASYNC110 - the actor's table, not our event
                await asyncio.sleep(0.05)
            run.delivered_s = time.perf_counter() - run.started
            await actor.stop()
            await actor.close()
            await task
            run.posts = posts
            run.received = _alertmanager_received(am_url) - received_before
    return run


async def _servers_cpu(pool: asyncpg.Pool, am_pid: int | None) -> float | None:
    """CPU-seconds so far of the PostgreSQL server's processes and the bench's Alertmanager."""
    pids = [row["pid"] for row in await pool.fetch("SELECT pid FROM pg_stat_activity")]
    try:
        return cpu_seconds(pids + ([am_pid] if am_pid else []))
    except (OSError, ValueError):  # a remote server, or processes we may not read
        return None


async def _timed(
    label: str, stores: Stores, sinks: list[Sink], batches: list[DecodedBatch], am_pid: int | None
) -> Run:
    me = [os.getpid()]
    servers_before = await _servers_cpu(stores.postgres, am_pid)
    cpu_before, started = cpu_seconds(me), time.perf_counter()
    for batch in batches:
        for sink in sinks:  # the writer's order
            await sink.write(batch)
    wall = time.perf_counter() - started
    cpu = cpu_seconds(me) - cpu_before
    servers_after = await _servers_cpu(stores.postgres, am_pid)
    servers = None if servers_before is None or servers_after is None else servers_after - servers_before
    return Run(label, sum(b.messages for b in batches), wall, cpu, started, servers)


async def _bench(
    settings: Settings, messages: int, devices: int, repeat: int, am_url: str, am_pid: int | None = None
) -> list[Run]:
    schema = f"bench_notify_{uuid.uuid4().hex[:8]}"
    bench = replace(settings, postgres=replace(settings.postgres, schema=schema))
    # Retries and refreshes as configured; the batch size is what the bench is about.
    await migrate(bench.postgres)
    runs: list[Run] = []
    try:
        async with open_stores(bench) as stores:
            fleet = await _devices(stores.postgres, devices)
            for n in range(repeat):
                for label in (PLAIN, NOTIFY) if n % 2 == 0 else (NOTIFY, PLAIN):
                    start = datetime.now(UTC) - timedelta(hours=1) + timedelta(minutes=len(runs))
                    run = await _run(label, stores, _batches(messages, fleet, start), am_url, am_pid)
                    runs.append(run)
                    print(_line(run), flush=True)
    finally:
        conn = await asyncpg.connect(settings.postgres.url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    return runs


def _line(run: Run) -> str:
    servers = run.servers_per_100k
    line = (
        f"{run.label:<22} {run.rate:>8,.0f} msg/s  worker {run.cpu_per_100k:5.2f} CPU-s/100k  "
        f"servers {'n/a' if servers is None else f'{servers:5.2f}'} CPU-s/100k"
    )
    if run.delivered_s is not None and run.posts is not None:
        line += (
            f"  {run.received:,.0f} alerts delivered after {run.delivered_s:.2f} s "
            f"in {len(run.posts)} POSTs of at most {max(run.posts, default=0)}"
        )
    return line


def report(runs: list[Run]) -> None:
    plain = [r for r in runs if r.label == PLAIN]
    notify = [r for r in runs if r.label == NOTIFY]
    rate, base = statistics.mean(r.rate for r in notify), statistics.mean(r.rate for r in plain)
    print(f"\nmeans over {len(plain)} runs each (servers: PostgreSQL and Alertmanager, while ingesting):")
    for label, group in ((PLAIN, plain), (NOTIFY, notify)):
        cpu = statistics.mean(r.cpu_per_100k for r in group)
        servers = [s for r in group if (s := r.servers_per_100k) is not None]
        shown = f"{statistics.mean(servers):5.2f}" if servers else "n/a"
        group_rate = statistics.mean(r.rate for r in group)
        print(
            f"{label:<22} {group_rate:>8,.0f} msg/s  worker {cpu:5.2f} CPU-s/100k  servers {shown} CPU-s/100k"
        )
    print(f"ingest with notifications: {rate / base:.1%} of the rate without (target ≥ 90%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.tools.bench.notify", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--devices", type=int, default=10_000, help="devices, each firing one alert per run")
    parser.add_argument("--messages", type=int, default=100_000, help="messages per run (3 readings each)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration, alternated")
    parser.add_argument("--embedded", action="store_true", help="start an embedded PostgreSQL and Redis")
    parser.add_argument(
        "--alertmanager", metavar="URL", help="an Alertmanager of your own (else one is started)"
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="settings file (else IOTFLOW_* and defaults)"
    )
    args = parser.parse_args(argv)
    if args.messages < args.devices:
        parser.error("--messages must be at least --devices (each device fires with its first message)")
    settings = load_settings(args.config)
    configure_logging("error", "console")
    with tempfile.TemporaryDirectory(prefix="iotflow-notify-bench-") as root, contextlib.ExitStack() as stack:
        am_url, am_pid = args.alertmanager, None
        if am_url is None:
            try:
                server = stack.enter_context(AlertmanagerServer(Path(root) / "alertmanager"))
                am_url, am_pid = server.url, server.pid
            except ServerUnavailable as exc:
                print(f"no Alertmanager: {exc}")
                return ExitCode.CONFIG
        if args.embedded:
            from worker.tools.embedded import EmbeddedServices

            services = stack.enter_context(EmbeddedServices(Path(root) / "services", mqtt=False)).start()
            settings.postgres = replace(settings.postgres, url=services.postgres_url)
            settings.redis = replace(settings.redis, url=services.redis_url)
        print(
            f"notify bench: {args.messages:,} messages × {READINGS_PER_MESSAGE} readings per run, "
            f"{args.devices:,} devices each firing an alert at once, Alertmanager batches of "
            f"{settings.notify.batch_size}, {args.repeat} runs per configuration",
            flush=True,
        )
        runs = asyncio.run(_bench(settings, args.messages, args.devices, args.repeat, am_url, am_pid))
    report(runs)
    return ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
