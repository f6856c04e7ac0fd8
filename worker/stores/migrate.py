"""`iotflow migrate`: versioned, idempotent DDL for PostgreSQL.

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

from worker.config import PostgresSettings
from worker.stores.partitions import PartitionKeeper
from worker.stores.postgres import connect

log = structlog.get_logger("worker.stores.migrate")

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


MIGRATIONS = (
    Migration(1, "relational core", _sql_file("0001_core.sql")),
    Migration(2, "time series", _create_timeseries),
    Migration(3, "dead letters", _sql_file("0003_dead_letters.sql")),
    # 4 seeded the simulator's demo fleet; the demo and the tests do that themselves now.
    Migration(5, "document store", _sql_file("0005_documents.sql")),
    Migration(10, "rollup tables", _sql_file("0010_rollups.sql")),
    Migration(11, "job runs", _sql_file("0011_job_runs.sql")),
    Migration(12, "datapoint ranges", _sql_file("0012_datapoint_ranges.sql")),
    Migration(13, "dead letter sizes", _sql_file("0013_dead_letter_sizes.sql")),
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


async def schema_problem(pool: asyncpg.Pool, schema: str) -> str | None:
    """Why this worker cannot use `schema` (not migrated, or behind), or None."""
    try:
        applied = {row["version"] for row in await pool.fetch("SELECT version FROM schema_migrations")}
    except asyncpg.UndefinedTableError:
        applied = set()
    missing = sorted({m.version for m in MIGRATIONS} - applied)
    if not applied:
        return f"schema {schema!r} has no migrations applied: run `iotflow migrate`"
    if missing:
        return f"schema {schema!r} lacks migrations {missing}: run `iotflow migrate`"
    return None
