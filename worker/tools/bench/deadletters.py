"""`iotflow bench --deadletters`: how fast `iotflow deadletters replay` brings a backlog back.

A day's rejects of a 1,000-device fleet whose devices were not added yet: N dead letters
(`unknown_device`, JSON telemetry of two readings without a time of its own, received
over the past 24 hours) in a schema of the bench's own; then the devices are added and
the replay of worker/sinks/replay.py runs as the command runs it. It prints dead letters
replayed per second and the CPU-seconds per 100,000 of this process and of the
PostgreSQL server processes serving it (read from /proc when the server is local),
checks that every reading is stored and every dead letter gone, and drops the schema.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from worker.config import Settings, load_settings
from worker.decode.decoder import fingerprint
from worker.exit_codes import ExitCode
from worker.logging import configure_logging
from worker.sinks.replay import BATCH_SIZE, replay_dead_letters
from worker.stores import open_stores
from worker.stores.dead_letters import Selection
from worker.stores.devices import DatapointSpec, DeviceSpec, add_devices
from worker.stores.migrate import migrate
from worker.stores.postgres import connect
from worker.tools.bench.support import cpu_seconds

DEVICES = 1000
READINGS_PER_LETTER = 2


@dataclass
class ReplayRun:
    dead_letters: int
    seconds: float
    cpu_s: float  # this process
    server_cpu_s: float | None  # the PostgreSQL backends serving it; None when not local
    readings: int

    @property
    def rate(self) -> float:
        return self.dead_letters / self.seconds

    def per_100k(self, cpu: float) -> float:
        return cpu / self.dead_letters * 100_000


def _postgres_processes(pids: list[int]) -> bool:
    """These are PostgreSQL processes on this machine (whose CPU /proc can tell)."""
    try:
        return all(Path(f"/proc/{pid}/comm").read_text().strip() == "postgres" for pid in pids)
    except OSError:
        return False


def _rows(count: int, now: datetime) -> list[tuple[Any, ...]]:
    """`count` distinct dead letters, spread over the devices and the past day."""
    rows = []
    step = timedelta(days=1) / count
    for n in range(count):
        key = f"dlbench-{n % DEVICES:04d}"
        topic = f"devices/{key}/telemetry"
        payload = orjson.dumps({"temperature": 20 + n // DEVICES / 100, "humidity": 40 + n % 7})
        at = now - timedelta(days=1) + step * n
        reason = f"unknown_device: key {key} is not in devices"
        rows.append(
            (
                fingerprint(topic, payload),
                topic,
                payload,
                len(payload),
                reason,
                at,
                at,
                len(topic),
                len(reason),
            )
        )
    return rows


async def run(settings: Settings, count: int, batch_size: int = BATCH_SIZE) -> ReplayRun:
    """One replay of `count` dead letters in a schema of its own (dropped afterwards)."""
    settings = replace(
        settings, postgres=replace(settings.postgres, schema=f"bench_deadletters_{uuid.uuid4().hex[:8]}")
    )
    await migrate(settings.postgres)
    try:
        conn = await connect(settings.postgres)
        try:
            await conn.copy_records_to_table(
                "dead_letters",
                records=_rows(count, datetime.now(UTC)),
                columns=[
                    "fingerprint", "topic", "payload", "payload_size", "reason",
                    "received_at", "last_received_at", "topic_size", "reason_size",
                ],
            )  # fmt: skip
            points = (DatapointSpec("temperature", "°C"), DatapointSpec("humidity", "%"))
            await add_devices(
                conn, [DeviceSpec(f"dlbench-{d:04d}", datapoints=points) for d in range(DEVICES)]
            )
        finally:
            await conn.close()
        async with open_stores(settings, application_name="iotflow-deadletters-bench", pool_size=2) as stores:
            async with stores.postgres.acquire() as a, stores.postgres.acquire() as b:
                servers = [await c.fetchval("SELECT pg_backend_pid()") for c in (a, b)]
            local = _postgres_processes(servers)
            server_before = cpu_seconds(servers) if local else 0.0
            before, started = cpu_seconds([os.getpid()]), time.perf_counter()
            tally = await replay_dead_letters(stores, Selection(), batch_size)
            seconds = time.perf_counter() - started
            cpu = cpu_seconds([os.getpid()]) - before
            server = cpu_seconds(servers) - server_before if local else None
            left = await stores.postgres.fetchval("SELECT count(*) FROM dead_letters")
            stored = await stores.postgres.fetchval("SELECT count(*) FROM decoded_data")
        if tally.replayed != count or left or stored != count * READINGS_PER_LETTER:
            raise AssertionError(
                f"replayed {tally.replayed} of {count}, {left} left, {stored} readings stored"
            )
        return ReplayRun(count, seconds, cpu, server, stored)
    finally:
        conn = await connect(replace(settings.postgres, schema="public"))
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.postgres.schema}" CASCADE')
        finally:
            await conn.close()


def report(result: ReplayRun, batch_size: int) -> None:
    server = (
        f", {result.per_100k(result.server_cpu_s):.2f} PostgreSQL"
        if result.server_cpu_s is not None
        else " (PostgreSQL not local: its CPU not read)"
    )
    print(
        f"replayed {result.dead_letters:,} dead letters ({DEVICES:,} devices, "
        f"{READINGS_PER_LETTER} readings each, "
        f"batches of {batch_size:,}) in {result.seconds:.2f} s: {result.rate:,.0f} dead letters/s; "
        f"CPU-seconds per 100k: {result.per_100k(result.cpu_s):.2f} replay{server}"
    )


def run_deadletters_bench(settings: Settings, count: int, batch_size: int, embedded: bool) -> int:
    configure_logging("error", "console")
    with (
        tempfile.TemporaryDirectory(prefix="iotflow-deadletters-bench-") as root,
        contextlib.ExitStack() as stack,
    ):
        if embedded:
            from worker.tools.embedded import EmbeddedServices

            services = stack.enter_context(EmbeddedServices(Path(root) / "services", mqtt=False))
            urls = services.start()
            settings.postgres = replace(settings.postgres, url=urls.postgres_url)
            settings.redis = replace(settings.redis, url=urls.redis_url)
        result = asyncio.run(run(settings, count, batch_size))
    report(result, batch_size)
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.tools.bench.deadletters", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--dead-letters", type=int, default=100_000, help="dead letters to replay")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="dead letters per transaction")
    parser.add_argument("--embedded", action="store_true", help="an embedded PostgreSQL and Redis")
    parser.add_argument(
        "--config", type=Path, default=None, help="settings file (else IOTFLOW_* and defaults)"
    )
    args = parser.parse_args(argv)
    return run_deadletters_bench(
        load_settings(args.config), args.dead_letters, args.batch_size, args.embedded
    )


if __name__ == "__main__":
    raise SystemExit(main())
