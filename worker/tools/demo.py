"""`iotflow demo`: the whole path on embedded services, with live progress.

Starts PostgreSQL, Redis and Mosquitto under `--data-dir` (or uses the configured
ones with `--external`), migrates, runs the worker and the simulator side by
side, adds a few malformed messages so the dead-letter path shows, and ends by
printing what landed and how to look at it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path

import orjson

from worker.config import Settings
from worker.logging import configure_logging
from worker.pipeline import Daemon
from worker.stores.keys import RedisKeys
from worker.stores.migrate import migrate
from worker.stores.postgres import connect
from worker.tools.simulate import build_fleet, register_fleet, simulate

# Deliberately broken messages: each must end up as a dead letter with its reason.
MALFORMED = (
    ("devices/sim-json-01/telemetry", b"{not json"),
    ("devices/stranger-42/telemetry", orjson.dumps({"temperature": 20.0})),
    (
        "tele/f2-aabbccddee01/sensor-mode/climate/sensor-room1",
        orjson.dumps({"timestamp": None, "data": "zz"}),
    ),
)


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    # The demo talks to a person: quiet logs, plain progress lines.
    configure_logging("warning", "console" if sys.stdout.isatty() else "json")
    if args.external:
        return asyncio.run(_demo(settings, args, embedded=False))
    from worker.tools.embedded import EmbeddedServices

    data_dir = Path(args.data_dir).resolve()
    print(f"starting embedded PostgreSQL, Redis and Mosquitto under {data_dir} …", flush=True)
    with EmbeddedServices(data_dir) as services:
        urls = services.start()
        settings.postgres = replace(settings.postgres, url=urls.postgres_url)
        settings.redis = replace(settings.redis, url=urls.redis_url)
        settings.mqtt = replace(settings.mqtt, url=urls.mqtt_url)
        code = asyncio.run(_demo(settings, args, embedded=True))
        if args.keep and code == 0:
            print(
                "\nthe embedded services keep running for the commands above; Ctrl-C stops them", flush=True
            )
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return code


async def _demo(settings: Settings, args: argparse.Namespace, embedded: bool) -> int:
    settings.http = replace(settings.http, enabled=False)
    settings.runtime = replace(settings.runtime, report_interval_s=3600)
    await migrate(settings.postgres)
    fleet = build_fleet(args.devices)
    await register_fleet(settings.postgres, fleet)
    daemon = Daemon(settings)
    worker = asyncio.create_task(daemon.run())
    async with asyncio.timeout(30):
        await daemon.ready.wait()
    print(
        f"worker ready; simulating {args.devices} devices at {args.rate:g} msg/s for {args.count} messages",
        flush=True,
    )
    started = time.monotonic()
    publisher = asyncio.create_task(
        asyncio.to_thread(simulate, settings.mqtt.url, args.devices, args.rate, args.count)
    )
    from worker.tools.simulate import Publisher

    bad = Publisher(settings.mqtt.url, f"iotflow-demo-bad-{time.time_ns()}")
    for topic, payload in MALFORMED:
        bad.publish(topic, payload)
    bad.close(len(MALFORMED))
    expected = args.count + len(MALFORMED)
    counters = daemon.metrics.counters
    while counters["messages_committed"] < expected:
        await asyncio.sleep(1.0)
        elapsed = time.monotonic() - started
        print(
            f"  {elapsed:5.1f}s  messages in {counters['messages_received']:>7}"
            f"  committed {counters['messages_committed']:>7}"
            f"  rows written {counters['readings_written']:>8}"
            f"  rejects {counters['dead_letters']:>3}",
            flush=True,
        )
        if worker.done():
            print(f"the worker stopped unexpectedly (exit {worker.result()})", file=sys.stderr)
            return 1
        if publisher.done() and publisher.exception():
            raise publisher.exception()  # type: ignore[misc]
    await publisher
    daemon.request_stop()
    code = await worker
    await _show(settings, embedded, args.keep)
    return code


async def _show(settings: Settings, embedded: bool, keep: bool) -> None:
    conn = await connect(settings.postgres)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM decoded_data")
        per_device = await conn.fetch(
            "SELECT d.device_key, count(*) AS readings, max(x.timestamp) AS last "
            "FROM decoded_data x JOIN devices d ON d.id = x.device_id GROUP BY d.device_key ORDER BY 1"
        )
        letters = await conn.fetch("SELECT topic, reason FROM dead_letters ORDER BY id")
        latest = await conn.fetch(
            "SELECT DISTINCT ON (p.label) p.label, x.value, p.unit FROM decoded_data x "
            "JOIN datapoints p ON p.id = x.datapoint_id JOIN devices d ON d.id = x.device_id "
            "WHERE d.mac = 'aa:bb:cc:dd:ee:01' ORDER BY p.label, x.timestamp DESC"
        )
    finally:
        await conn.close()
    print(f"\n{rows} readings in {settings.postgres.schema}.decoded_data:")
    for row in per_device:
        print(f"  {row['device_key']:<16} {row['readings']:>6} readings, last at {row['last']:%H:%M:%S}")
    print("\nlatest values of F2 controller aa:bb:cc:dd:ee:01:")
    for row in latest:
        print(f"  {row['label']:<20} {row['value']:>10g} {row['unit'] or ''}")
    print(f"\n{len(letters)} dead letters (rejected, stored with the reason, acknowledged):")
    for row in letters:
        print(f"  {row['topic']:<55} {row['reason'][:70]}")
    keys = RedisKeys(settings.redis.key_prefix)
    if embedded and not keep:
        print("\nto query the data yourself, run `iotflow demo --keep`: the embedded services then stay up")
        print("(the PostgreSQL data stays under --data-dir either way)")
        return
    print("\nlook at the data yourself:")
    print(f"  psql '{settings.postgres.url}' -c 'SET search_path = {settings.postgres.schema};")
    print("       SELECT * FROM decoded_data ORDER BY timestamp DESC LIMIT 10;'")
    print(f"  redis-cli -u {settings.redis.url} HGETALL {keys.device_latest(1)}")
    print(f"  curl http://{settings.http.host}:{settings.http.port}/metrics   # while `iotflow run` runs")
