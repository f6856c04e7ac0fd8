"""`iotflow migrate`: versioned, idempotent DDL and seed metadata for PostgreSQL.

Each migration runs once, in its own transaction, recorded in `schema_migrations`;
an advisory lock keeps two `migrate` runs (or two starting containers) apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources

import asyncpg
import structlog

from schemas import fleet
from worker.config import PostgresSettings
from worker.db import connect
from worker.decode.codecs import load_codecs
from worker.partitions import PartitionKeeper

log = structlog.get_logger("worker.migrate")

Step = Callable[[asyncpg.Connection, PostgresSettings], Awaitable[None]]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Step


def _sql_file(name: str) -> Step:
    async def apply(conn: asyncpg.Connection, settings: PostgresSettings) -> None:
        await conn.execute((resources.files("schemas") / "sql" / name).read_text("utf-8"))

    return apply


async def _timescale_available(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval("SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")
    )


async def _create_timeseries(conn: asyncpg.Connection, settings: PostgresSettings) -> None:
    """`decoded_data` (SPEC §3): a compressed hypertable, or native range partitions."""
    use_timescale = settings.timescale == "on" or (
        settings.timescale == "auto" and await _timescale_available(conn)
    )
    columns = """
        timestamp    timestamptz NOT NULL,
        device_id    integer NOT NULL,
        datapoint_id integer NOT NULL,
        value        double precision,
        PRIMARY KEY (timestamp, device_id, datapoint_id)"""
    if use_timescale:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        await conn.execute(f"CREATE TABLE IF NOT EXISTS decoded_data ({columns})")
        await conn.execute(
            "SELECT create_hypertable('decoded_data', 'timestamp', "
            f"chunk_time_interval => interval '{settings.partition_days} days', if_not_exists => true)"
        )
        await conn.execute(
            "ALTER TABLE decoded_data SET (timescaledb.compress, "
            "timescaledb.compress_segmentby = 'device_id, datapoint_id', "
            "timescaledb.compress_orderby = 'timestamp DESC')"
        )
        await conn.execute(
            "SELECT add_compression_policy('decoded_data', interval '7 days', if_not_exists => true)"
        )
        log.info("migrate.timeseries", backend="timescaledb")
    else:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS decoded_data ({columns}) PARTITION BY RANGE (timestamp)"
        )
        keeper = PartitionKeeper(settings.partition_days)
        now = datetime.now(UTC)
        days = [now + timedelta(days=offset) for offset in range(-1, 8)]
        await keeper.ensure(conn, keeper.missing(days))
        log.info("migrate.timeseries", backend="partitioned", partition_days=settings.partition_days)
    await conn.execute(
        "CREATE INDEX IF NOT EXISTS decoded_data_device_time "
        "ON decoded_data (device_id, datapoint_id, timestamp DESC)"
    )


async def _seed_fleet(conn: asyncpg.Connection, settings: PostgresSettings) -> None:
    """The demo user, the simulator's four F2 controllers and four JSON devices."""
    user_id = await conn.fetchval(
        "INSERT INTO users (username, email) VALUES ($1, $2) ON CONFLICT (username) "
        "DO UPDATE SET email = excluded.email RETURNING id",
        fleet.DEMO_USER,
        "demo@example.invalid",
    )
    codecs = load_codecs()
    f2_datapoints = [
        (f"{label}.{name}", unit)
        for mode, label, _ in fleet.F2_SENSORS
        for name, unit in codecs[mode].units().items()
    ]
    for index, mac in enumerate(fleet.F2_MACS):
        await _seed_device(
            conn,
            user_id,
            mac,
            fleet.f2_device_key(mac),
            f"F2 controller {index + 1}",
            f2_datapoints,
        )
    for key in fleet.JSON_DEVICE_KEYS:
        await _seed_device(conn, user_id, None, key, f"JSON sensor {key}", list(fleet.JSON_MEASUREMENTS))


async def _seed_device(
    conn: asyncpg.Connection,
    user_id: int,
    mac: str | None,
    key: str,
    name: str,
    datapoints: list[tuple[str, str | None]],
) -> None:
    device_id = await conn.fetchval(
        "INSERT INTO devices (mac, device_key, user_id, name) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (device_key) DO UPDATE SET name = excluded.name RETURNING id",
        mac,
        key,
        user_id,
        name,
    )
    await conn.executemany(
        "INSERT INTO datapoints (device_id, label, unit) VALUES ($1, $2, $3) "
        "ON CONFLICT (device_id, label) DO NOTHING",
        [(device_id, label, unit) for label, unit in datapoints],
    )


MIGRATIONS = (
    Migration(1, "relational core", _sql_file("0001_core.sql")),
    Migration(2, "time series", _create_timeseries),
    Migration(3, "dead letters", _sql_file("0003_dead_letters.sql")),
    Migration(4, "seed metadata", _seed_fleet),
    Migration(5, "document store", _sql_file("0005_documents.sql")),
    Migration(10, "rollup tables", _sql_file("0010_rollups.sql")),
    Migration(11, "job runs", _sql_file("0011_job_runs.sql")),
)


async def migrate(settings: PostgresSettings) -> list[int]:
    """Apply what is missing; return the versions applied now."""
    conn = await connect(settings)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{settings.schema}"')
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"iotflow.migrate.{settings.schema}")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            async with conn.transaction():
                await migration.apply(conn, settings)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("migrate.applied", version=migration.version, name=migration.name)
            applied.append(migration.version)
        log.info("migrate.done", schema=settings.schema, applied=applied, total=len(MIGRATIONS))
        return applied
    finally:
        await conn.close()


async def schema_problem(settings: PostgresSettings) -> str | None:
    """Why this worker cannot use the schema (not migrated, or behind), or None.

    An unreachable database is not a schema problem: the supervisor retries it."""
    try:
        conn = await connect(settings, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None
    try:
        applied = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    except asyncpg.UndefinedTableError:
        applied = set()
    finally:
        await conn.close()
    missing = sorted({m.version for m in MIGRATIONS} - applied)
    if not applied:
        return f"schema {settings.schema!r} has no migrations applied: run `iotflow migrate`"
    if missing:
        return f"schema {settings.schema!r} lacks migrations {missing}: run `iotflow migrate`"
    return None
