"""`iotflow bench --timeseries cassandra|both`: a time-series backend's storage step beside PostgreSQL.

The writer's storage step, in one process, with the same batches (climate messages of
three readings, 5,000 readings a batch, new timestamps every run), the configurations
alternated run by run, each built as the daemon builds it (`mirrored_readings`, the
Cassandra sink):

- `postgres`: the PostgreSQL sink alone (what `timeseries.backend = "postgres"` writes);
- `cassandra`, `both` (only with a Cassandra, named by IOTFLOW_CASSANDRA_HOSTS): the
  Cassandra sink beside PostgreSQL's core writer; both stores at once;
- `both, cassandra down`: both mode with Cassandra at a port that refuses connections
  (the daemon's Cassandra sink and driver): every batch goes to PostgreSQL and, encoded,
  into the `outbox` table; after the first failure Cassandra is not tried per batch,
  only by the replay, so how it fails does not change the cost;
- `both, postgres down`: PostgreSQL refusing: every batch goes to the other store
  (Cassandra, or without one a PostgreSQL schema of its own) and into the fsynced journal.

For each: messages/s, and CPU-seconds per 100,000 messages of this process and of the
PostgreSQL server (its processes listed by pg_stat_activity, read from /proc when the
server is local), from /proc. The ratios compare each path with `postgres` in the
same run. It isolates the storage step, so the ratio is the outbox's whole cost relative
to storage alone; end to end (MQTT, decoding) the same cost weighs less.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import asyncpg

from schemas.records import DecodedBatch, Reading
from worker.config import Settings, load_settings
from worker.exit_codes import ExitCode
from worker.logging import configure_logging
from worker.metrics import Metrics
from worker.sinks.base import Sink
from worker.sinks.cassandra import CassandraTimeseriesWriter
from worker.sinks.mirror import MirroredReadings, mirrored_readings
from worker.sinks.outbox import JournalOutbox, PostgresOutbox
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.sinks.postgres_core import PostgresCoreWriter
from worker.stores import Stores, open_stores
from worker.stores.cassandra import CassandraStore
from worker.stores.cassandra_schema import migrate_cassandra
from worker.stores.migrate import migrate
from worker.stores.timeseries import read_device
from worker.tools.bench.support import READINGS_PER_MESSAGE, cpu_seconds
from worker.tools.embedded import free_port
from worker.tools.servers import CassandraServer, ServerUnavailable

BATCH_READINGS = 5000
Timeseries = Literal["cassandra", "both"]


class RefusingStore:
    """A readings store at a port nobody listens on: every write is refused by the OS."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._port = free_port()

    async def write(self, batch: DecodedBatch) -> int:
        _, writer = await asyncio.open_connection("127.0.0.1", self._port)  # ConnectionRefusedError
        writer.close()
        raise AssertionError("a refusing port accepted a connection")

    async def reset(self) -> None:
        """Nothing is kept between tries."""

    async def close(self) -> None:
        """Nothing to close."""


class OtherPostgres(PostgresTimeseriesWriter):
    name = "other"


@dataclass
class Run:
    label: str
    messages: int
    wall_s: float
    cpu_s: float  # this process
    server_cpu_s: float | None  # the PostgreSQL server, when its processes can be read
    cassandra_cpu_s: float | None = None  # the Cassandra server, when it is the bench's own

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s

    def per_100k(self, seconds: float) -> float:
        return seconds * 100_000 / self.messages


async def _server_cpu(pool: asyncpg.Pool) -> float | None:
    pids = [row["pid"] for row in await pool.fetch("SELECT pid FROM pg_stat_activity")]
    try:
        return cpu_seconds(pids)
    except (OSError, ValueError):  # a remote server, or processes we may not read
        return None


def _batches(messages: int, devices: list[tuple[int, list[int]]], start: datetime) -> list[DecodedBatch]:
    readings: list[Reading] = []
    for n in range(messages):
        device, points = devices[n % len(devices)]
        at = start + timedelta(milliseconds=n)
        readings += [Reading(at, device, point, float(n % 1000), f"p{i}") for i, point in enumerate(points)]
    per_message = BATCH_READINGS // READINGS_PER_MESSAGE
    batches = []
    for first in range(0, messages, per_message):
        chunk = readings[first * READINGS_PER_MESSAGE : (first + per_message) * READINGS_PER_MESSAGE]
        batches.append(
            DecodedBatch(
                readings=chunk,
                messages=len(chunk) // READINGS_PER_MESSAGE,
                device_users={device: None for device, _ in devices},
            )
        )
    return batches


async def _measure(
    label: str, sink: Sink, batches: list[DecodedBatch], pool: asyncpg.Pool, cassandra_pid: int | None = None
) -> Run:
    server_before = await _server_cpu(pool)
    cassandra_before = cpu_seconds([cassandra_pid]) if cassandra_pid else None
    me = [os.getpid()]
    cpu_before, started = cpu_seconds(me), time.perf_counter()
    for batch in batches:
        await sink.write(batch)
    wall, cpu = time.perf_counter() - started, cpu_seconds(me) - cpu_before
    server_after = await _server_cpu(pool)
    server = None if server_before is None or server_after is None else server_after - server_before
    cassandra = None
    if cassandra_pid and cassandra_before is not None:
        with contextlib.suppress(OSError):  # killed meanwhile (the outage)
            cassandra = cpu_seconds([cassandra_pid]) - cassandra_before
    return Run(label, sum(b.messages for b in batches), wall, cpu, server, cassandra)


def cassandra_configured() -> bool:
    """A Cassandra to measure is one named by IOTFLOW_CASSANDRA_HOSTS (the default contact
    point, 127.0.0.1, is no sign that one runs)."""
    return bool(os.environ.get("IOTFLOW_CASSANDRA_HOSTS"))


def labels(timeseries: Timeseries, live: bool) -> list[str]:
    """The configurations a run measures, `postgres` first (the ratios' base)."""
    if timeseries == "cassandra":
        return ["postgres", "cassandra"]
    return ["postgres", *(["both"] if live else []), "both, cassandra down", "both, postgres down"]


async def _bench(
    settings: Settings,
    messages: int,
    repeat: int,
    data_dir: Path,
    timeseries: Timeseries = "both",
    live: bool = False,
    server: CassandraServer | None = None,
) -> list[Run]:
    """`live`: measure the configured Cassandra too; without it, Cassandra's place in the
    outbox paths is taken by a port that refuses connections (and by a second PostgreSQL
    schema where both mode needs a store that is up). `server`: the bench's own Cassandra,
    whose CPU it reads, and which it kills and restarts for the outage and its replay."""
    tag = uuid.uuid4().hex[:8]
    storage = replace(settings.storage, data_dir=str(data_dir))
    main = replace(
        settings, postgres=replace(settings.postgres, schema=f"bench_outbox_{tag}"), storage=storage
    )
    other = replace(settings, postgres=replace(settings.postgres, schema=f"bench_outbox_{tag}_other"))
    for target in (main, other):
        await migrate(target.postgres)
    # Cassandra at a port nobody listens on: the daemon's own Cassandra sink, refused by the OS.
    down = CassandraStore(replace(settings.cassandra, hosts=["127.0.0.1"], port=free_port()))
    cassandra = CassandraStore(replace(settings.cassandra, keyspace=f"bench_{tag}")) if live else None
    try:
        if cassandra is not None:
            await migrate_cassandra(cassandra)
        async with open_stores(main) as stores, open_stores(other) as other_stores:
            devices = await _devices(stores.postgres, 100)

            def postgres() -> Sink:
                return PostgresTimeseriesWriter(stores)

            def up() -> Sink:  # the second store, up
                if cassandra is not None:
                    return CassandraTimeseriesWriter(cassandra)
                return OtherPostgres(other_stores)

            makers: dict[str, Callable[[], Sink]] = {
                "postgres": postgres,
                "both, cassandra down": lambda: mirrored_readings(
                    postgres(), CassandraTimeseriesWriter(down), stores, Metrics()
                ),
                "both, postgres down": lambda: _mirror(RefusingStore("postgres"), up(), stores),
            }
            if cassandra is not None:
                store = cassandra
                makers["cassandra"] = lambda: Together(
                    [CassandraTimeseriesWriter(store), PostgresCoreWriter(stores)]
                )
                makers["both"] = lambda: mirrored_readings(postgres(), up(), stores, Metrics())
            runs = []
            start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
            for number in range(repeat):
                for label in labels(timeseries, cassandra is not None):
                    await _empty(stores, other_stores, data_dir)
                    batches = _batches(messages, devices, start)
                    start += timedelta(milliseconds=messages)  # new rows every run
                    sink = makers[label]()
                    try:
                        pid = server.pid if server is not None else None
                        run = await _measure(f"{label} #{number + 1}", sink, batches, stores.postgres, pid)
                    finally:
                        await sink.close()
                    print(_line(run), flush=True)
                    runs.append(run)
            if cassandra is not None:  # one device's readings in both stores, then read back
                seed = makers["both"]()
                try:
                    for batch in _batches(1000, devices[:1], start):
                        await seed.write(batch)
                finally:
                    await seed.close()
                await _range_reads(main, cassandra, devices[0][0], start + timedelta(hours=1))
                start += timedelta(seconds=1)
            if cassandra is not None and server is not None and timeseries == "both":
                await _outage(server, makers["both"](), _batches(messages, devices, start), stores)
            return runs
    finally:
        for target in (main, other):
            await _drop_schema(target)
        if cassandra is not None:
            with contextlib.suppress(Exception):
                await cassandra.execute(f"DROP KEYSPACE IF EXISTS {cassandra.settings.keyspace}")
            await cassandra.close()
        await down.close()


READS = 15


async def _range_reads(
    settings: Settings, cassandra: CassandraStore, device_id: int, before: datetime
) -> None:
    """The median of READS reads of one 100-row page of a device's range (its newest rows),
    through `read_device`, from each store, in this process."""
    both = replace(settings, timeseries=replace(settings.timeseries, backend="both"))
    async with open_stores(settings) as stores:
        source = _ReadSource(both, cassandra, stores.postgres)
        for store in ("cassandra", "postgres"):
            times = []
            for _ in range(READS):
                started = time.perf_counter()
                page = await read_device(
                    source, device_id, before - timedelta(days=2), before, page_size=100, store=store
                )
                times.append(time.perf_counter() - started)
                assert len(page.rows) == 100, f"{store}: {len(page.rows)} rows"
            print(
                f"100-row range read ({store}, read_device): "
                f"median {statistics.median(times) * 1000:.1f} ms, "
                f"max {max(times) * 1000:.1f} ms over {READS}",
                flush=True,
            )


@dataclass
class _ReadSource:
    settings: Settings
    cassandra: CassandraStore | None
    postgres: asyncpg.Pool


async def _outage(server: CassandraServer, sink: Sink, batches: list[DecodedBatch], stores: Stores) -> None:
    """Both mode with the bench's Cassandra killed (-9): the batches go to PostgreSQL and the
    outbox; then Cassandra restarted, and the time until the outbox is replayed."""
    await stores.postgres.execute("TRUNCATE outbox")
    try:
        await sink.write(batches[0])  # connected, direct
        await asyncio.to_thread(server.kill)
        run = await _measure("both, cassandra killed #1", sink, batches[1:], stores.postgres)
        print(_line(run), flush=True)
        held = await stores.postgres.fetchval("SELECT count(*) FROM outbox")
        started = time.perf_counter()
        await asyncio.to_thread(server.start)
        serving = time.perf_counter() - started
        deadline = time.perf_counter() + 300
        while True:  # the sink's replayer empties it; nothing to wait on but the table
            if not await stores.postgres.fetchval("SELECT count(*) FROM outbox"):
                break
            if time.perf_counter() > deadline:
                raise RuntimeError("the outbox was not replayed within 300 s of Cassandra's return")
            await asyncio.sleep(0.1)
        drained = time.perf_counter() - started - serving
        readings = sum(len(b.readings) for b in batches[1:])
        print(
            f"cassandra outage: {held} batches ({readings:,} readings) held; restart {serving:.1f} s to "
            f"serve, then the outbox replayed in {drained:.1f} s ({readings / drained:,.0f} readings/s "
            "including the driver's reconnection and the replay's backoff)",
            flush=True,
        )
    finally:
        await sink.close()
        if server.problem() is not None:
            await asyncio.to_thread(server.start)


class Together:
    """Sinks written at once, as the writer writes them (`timeseries.backend = "cassandra"`:
    Cassandra's readings and PostgreSQL's dead letters and last-seen times)."""

    name = "together"

    def __init__(self, sinks: list[Sink]) -> None:
        self._sinks = sinks

    async def write(self, batch: DecodedBatch) -> int:
        counts = await asyncio.gather(*(sink.write(batch) for sink in self._sinks))
        return max(count or 0 for count in counts)

    async def reset(self) -> None:
        for sink in self._sinks:
            await sink.reset()

    async def close(self) -> None:
        for sink in self._sinks:
            await sink.close()


def _mirror(primary: Sink, secondary: Sink, stores: Stores) -> Sink:
    """Both mode with `secondary` in Cassandra's place (whatever its name)."""
    journal = JournalOutbox(Path(stores.settings.storage.data_dir) / "outbox-postgres.journal")
    outboxes = (journal, PostgresOutbox(stores.postgres, secondary.name))
    return MirroredReadings(primary, secondary, outboxes, Metrics(), stores.settings.storage.write_timeout_s)


async def _devices(pool: asyncpg.Pool, count: int) -> list[tuple[int, list[int]]]:
    """`count` devices of three datapoints each, made for the bench."""
    devices = []
    async with pool.acquire() as conn:
        for n in range(count):
            device = await conn.fetchval(
                "INSERT INTO devices (device_key, name) VALUES ($1, $1) RETURNING id", f"bench-outbox-{n}"
            )
            points = [
                await conn.fetchval(
                    "INSERT INTO datapoints (device_id, label) VALUES ($1, $2) RETURNING id", device, f"p{i}"
                )
                for i in range(READINGS_PER_MESSAGE)
            ]
            devices.append((device, points))
    return devices


async def _empty(stores: Stores, other_stores: Stores, data_dir: Path) -> None:
    for pool in (stores.postgres, other_stores.postgres):
        await pool.execute("TRUNCATE decoded_data")
    await stores.postgres.execute("TRUNCATE outbox")
    (data_dir / "outbox-postgres.journal").unlink(missing_ok=True)


async def _drop_schema(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.postgres.url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.postgres.schema}" CASCADE')
    finally:
        await conn.close()


def _line(run: Run) -> str:
    server = "n/a" if run.server_cpu_s is None else f"{run.per_100k(run.server_cpu_s):.2f}"
    line = (
        f"{run.label:<28} {run.rate:>9,.0f} msg/s ({run.rate * READINGS_PER_MESSAGE:>7,.0f} readings/s)  "
        f"worker {run.per_100k(run.cpu_s):5.2f} CPU-s/100k  PostgreSQL {server} CPU-s/100k"
    )
    if run.cassandra_cpu_s is not None:
        line += f"  Cassandra {run.per_100k(run.cassandra_cpu_s):.2f} CPU-s/100k"
    return line


def _ratio(value: float, base: float) -> str:
    # A short run can take less than one 10 ms clock tick of CPU: no ratio then.
    return f"{value / base:6.1%}" if base else "   n/a"


def report(runs: list[Run], timeseries: Timeseries = "both", live: bool = False) -> None:
    def by(label: str) -> list[Run]:
        return [run for run in runs if run.label.startswith(label + " #")]

    base = by("postgres")
    base_rate = statistics.mean(r.rate for r in base)
    base_cpu = statistics.mean(r.per_100k(r.cpu_s) for r in base)
    print("\nmeans over the runs (ratios against `postgres` of the same run set):")
    for label in labels(timeseries, live):
        group = by(label)
        rate = statistics.mean(r.rate for r in group)
        cpu = statistics.mean(r.per_100k(r.cpu_s) for r in group)
        line = (
            f"{label:<24} {rate:>9,.0f} msg/s ({rate / base_rate:6.1%})  "
            f"worker {cpu:5.2f} CPU-s/100k ({_ratio(cpu, base_cpu)})"
        )
        servers = [r.per_100k(r.server_cpu_s) for r in group if r.server_cpu_s is not None]
        if servers:
            line += f"  PostgreSQL {statistics.mean(servers):5.2f} CPU-s/100k"
        cassandras = [r.per_100k(r.cassandra_cpu_s) for r in group if r.cassandra_cpu_s is not None]
        if cassandras:
            line += f"  Cassandra {statistics.mean(cassandras):5.2f} CPU-s/100k"
        print(line)
    for label in ("both, cassandra down", "both, postgres down"):
        if by(label):
            cost = 1 - statistics.mean(r.rate for r in by(label)) / base_rate
            print(f"cost of '{label}' (its outbox): {cost:.1%} of the PostgreSQL-only rate (target ≤ 25%)")


def run_timeseries_bench(settings: Settings, args: argparse.Namespace) -> int:
    """`iotflow bench --timeseries cassandra|both` (and `python -m worker.tools.bench.outbox`).
    With --embedded and no IOTFLOW_CASSANDRA_HOSTS, a Cassandra of its own (a temporary
    directory, stopped at the end), killed and restarted once in `both` for the outage."""
    timeseries: Timeseries = args.timeseries
    configured = cassandra_configured()
    if timeseries == "cassandra" and not configured and not args.embedded:
        print(
            "iotflow bench --timeseries cassandra needs a Cassandra: "
            "set IOTFLOW_CASSANDRA_HOSTS or pass --embedded"
        )
        return ExitCode.CONFIG
    configure_logging("error", "console")
    with tempfile.TemporaryDirectory(prefix="iotflow-outbox-bench-") as root, contextlib.ExitStack() as stack:
        server = None
        if args.embedded and not configured:
            try:
                server = stack.enter_context(CassandraServer(Path(root) / "cassandra"))
            except ServerUnavailable as exc:
                print(f"no Cassandra of the bench's own: {exc}")
                if timeseries == "cassandra":
                    return ExitCode.CONFIG
            else:
                settings.cassandra = replace(
                    settings.cassandra, hosts=["127.0.0.1"], port=server.port, local_dc="datacenter1"
                )
        live = configured or server is not None
        where = (
            "its own Cassandra 5.0 (one node)"
            if server
            else f"Cassandra at {','.join(settings.cassandra.hosts)}"
        )
        print(
            f"timeseries bench ({timeseries}): the storage step alone, {args.messages:,} messages × "
            f"{READINGS_PER_MESSAGE} readings per run, {BATCH_READINGS} readings a batch, "
            f"{args.repeat} runs per configuration, " + (where if live else "no Cassandra: it is down"),
            flush=True,
        )
        data_dir = Path(root) / "data"
        data_dir.mkdir()
        if args.embedded:
            from worker.tools.embedded import EmbeddedServices

            services = stack.enter_context(EmbeddedServices(Path(root) / "services", redis=False, mqtt=False))
            settings.postgres = replace(settings.postgres, url=services.start().postgres_url)
        runs = asyncio.run(_bench(settings, args.messages, args.repeat, data_dir, timeseries, live, server))
    report(runs, timeseries, live)
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.tools.bench.outbox", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--messages", type=int, default=100_000, help="messages per run (3 readings each)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration, alternated")
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="start an embedded PostgreSQL, and a Cassandra unless IOTFLOW_CASSANDRA_HOSTS names one",
    )
    parser.add_argument("--timeseries", choices=("cassandra", "both"), default="both")
    parser.add_argument(
        "--config", type=Path, default=None, help="settings file (else IOTFLOW_* and defaults)"
    )
    args = parser.parse_args(argv)
    return run_timeseries_bench(load_settings(args.config), args)


if __name__ == "__main__":
    raise SystemExit(main())
