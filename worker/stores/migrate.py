"""`iotflow migrate`: versioned, idempotent DDL for PostgreSQL, and MongoDB's indexes.

Each PostgreSQL migration runs once, in its own transaction, recorded in
`schema_migrations`; an advisory lock keeps two `migrate` runs (or two starting
containers) apart. MongoDB's indexes (schemas/mongo.py) are compared and applied on
every run instead: their TTLs follow the retention settings, which may have changed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import asyncpg
import structlog

from schemas.mongo import TTL_INDEXES, mongo_indexes
from worker.config import PostgresSettings, Settings
from worker.stores.documents import MongoDocumentStore
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


class MigrationRefused(Exception):
    """The database cannot give what the settings ask for; `iotflow migrate` exits 2 with this."""


class SchemaNotReady(Exception):
    """The schema lacks migrations (`schema_problem` says which): a process that needs them
    stops before its work, and the command exits 2."""


@dataclass(frozen=True)
class TimescaleProbe:
    """What the server says about TimescaleDB, before anything touches it."""

    available: bool  # the extension's files are installed (`pg_available_extensions`)
    preload: str | None  # `shared_preload_libraries`; None: this role may not read it
    schema: str | None  # where the extension is created in this database, if it is

    @property
    def preloaded(self) -> bool | None:
        if self.preload is None:
            return None
        names = (item.strip().strip('"').rsplit("/", 1)[-1] for item in self.preload.split(","))
        return any(name == "timescaledb" or name.startswith("timescaledb-") for name in names)


async def probe_timescale(conn: asyncpg.Connection) -> TimescaleProbe:
    row = await conn.fetchrow(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') AS available, "
        "(SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        " WHERE e.extname = 'timescaledb') AS schema"
    )
    assert row is not None  # a SELECT without FROM returns one row
    preload: str | None = ""
    if row["available"]:
        try:
            async with conn.transaction():  # a savepoint: the refusal must not end the migration's
                preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
        except asyncpg.InsufficientPrivilegeError:  # superuser or pg_read_all_settings only
            preload = None
    return TimescaleProbe(bool(row["available"]), preload, row["schema"])


NOT_PRELOADED = (
    "TimescaleDB is installed but not preloaded: add timescaledb to shared_preload_libraries "
    "in postgresql.conf (or run timescaledb-tune) and restart PostgreSQL"
)
UNKNOWN_PRELOAD = (
    "TimescaleDB is installed, but this role may not read shared_preload_libraries (superuser "
    "or pg_read_all_settings only): create the extension as a superuser (CREATE EXTENSION "
    "timescaledb SCHEMA public) or set postgres.timescale = on"
)


def use_timescale(mode: str, probe: TimescaleProbe) -> bool:
    """`postgres.timescale`: "off" never, "on" always (refused when unusable), "auto" when usable.

    Usable means installed and preloaded: without the preload the server ends the session
    (`FATAL: extension "timescaledb" must be preloaded`) as soon as the library loads. A role
    that may not read the setting trusts an extension already created in the database.
    """
    if mode == "off":
        return False
    preloaded = probe.preloaded
    if preloaded is None and probe.schema is not None:
        preloaded = True  # created by someone who could: it loads, or nothing here would work
    if probe.available and (preloaded or (preloaded is None and mode == "on")):
        return True  # on, and unknown: the user asks for it; a missing preload then shows itself
    if mode == "on":
        if not probe.available:
            raise MigrationRefused("postgres.timescale is on but TimescaleDB is not installed")
        raise MigrationRefused(NOT_PRELOADED)
    if probe.available:
        log.warning(
            "migrate.timescaledb_unusable",
            reason=NOT_PRELOADED if preloaded is False else UNKNOWN_PRELOAD,
            fallback="range partitions",
        )
    return False


async def ensure_timescale(conn: asyncpg.Connection, probe: TimescaleProbe, schema: str) -> str:
    """The schema holding TimescaleDB's functions: where it already is, else `public`.

    Never the application schema: its functions would then need that schema on the search
    path, a second application schema could not use them, and `DROP SCHEMA … CASCADE` of
    the application schema would drop the extension for the whole database.
    """
    if probe.schema is None:
        # One database-wide lock: two schemas migrating at once would both create it.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('iotflow.migrate.timescaledb'))")
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb SCHEMA public")
        found: str = await conn.fetchval(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'timescaledb'"
        )
        return found
    if probe.schema == schema:
        log.warning(
            "migrate.timescaledb_in_app_schema",
            schema=schema,
            reason="an earlier version created the extension here; DROP SCHEMA … CASCADE would drop it "
            "for the whole database",
        )
    return probe.schema


async def _create_timeseries(conn: asyncpg.Connection, settings: PostgresSettings) -> None:
    """`decoded_data`: a compressed hypertable, or native range partitions."""
    probe = await probe_timescale(conn)
    columns = """
        timestamp    timestamptz NOT NULL,
        device_id    integer NOT NULL,
        datapoint_id integer NOT NULL,
        value        double precision,
        PRIMARY KEY (timestamp, device_id, datapoint_id)"""
    if use_timescale(settings.timescale, probe):
        ts = quote_ident(await ensure_timescale(conn, probe, settings.schema))
        table = f"{quote_ident(settings.schema)}.decoded_data"
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")
        # No default index on `timestamp`: the primary key already leads with it.
        await conn.execute(
            f"SELECT {ts}.create_hypertable('{table}', 'timestamp', "
            f"chunk_time_interval => interval '{settings.partition_days} days', if_not_exists => true, "
            "create_default_indexes => false)"
        )
        await conn.execute(
            f"ALTER TABLE {table} SET (timescaledb.compress, "
            "timescaledb.compress_segmentby = 'device_id, datapoint_id', "
            "timescaledb.compress_orderby = 'timestamp DESC')"
        )
        await conn.execute(
            f"SELECT {ts}.add_compression_policy('{table}', interval '7 days', if_not_exists => true)"
        )
        log.info("migrate.timeseries", backend="timescaledb", extension_schema=ts)
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


async def _drop_timestamp_index(conn: asyncpg.Connection, settings: PostgresSettings) -> None:
    """Hypertables made before version 14 got TimescaleDB's default index on `timestamp`,
    which duplicates the primary key's leading column. Only this schema's."""
    await conn.execute(f"DROP INDEX IF EXISTS {quote_ident(settings.schema)}.decoded_data_timestamp_idx")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
    Migration(14, "no duplicate timestamp index", _drop_timestamp_index),
    Migration(15, "outbox", _sql_file("0015_outbox.sql")),
    Migration(17, "document indexes", _sql_file("0017_document_indexes.sql")),
    Migration(20, "device api keys", _sql_file("0020_device_api_keys.sql")),
    Migration(21, "notification outbox", _sql_file("0021_notifications.sql")),
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


async def migrate_documents(settings: Settings) -> bool:
    """MongoDB's collections and indexes when `documents.backend` is mongodb; False when
    it is not (the JSONB backend's indexes are PostgreSQL migrations)."""
    if settings.documents.backend != "mongodb":
        return False
    jobs = settings.jobs
    indexes = mongo_indexes(jobs.retention_event_logs_days, jobs.retention_resolved_alerts_days)
    store = MongoDocumentStore(settings.documents)
    try:
        await store.ping()
        server = server_name(await store.server_info())
        refused = await store.apply_indexes(indexes, TTL_INDEXES - {(i.collection, i.name) for i in indexes})
    finally:
        await store.close()
    log.info(
        "migrate.mongodb_done",
        database=settings.documents.mongodb_database,
        server=server,
        indexes=len(indexes) - len(refused),
        refused=[index.name for index in refused],
    )
    return True


def server_name(info: Mapping[str, Any]) -> str:
    """ "FerretDB v1.24.2" or "MongoDB 7.0.14", from `buildInfo` (for the operator's eyes only:
    what the server refuses is decided by its answers, worker/stores/documents.py)."""
    if "ferretdbVersion" in info:
        return f"FerretDB {info['ferretdbVersion']}"
    return f"MongoDB {info.get('version', '?')}"


async def applied_migrations(conn: asyncpg.Pool | asyncpg.Connection) -> set[int]:
    """The versions recorded in the search path's schema; none when it was never migrated."""
    try:
        return {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    except asyncpg.UndefinedTableError:
        return set()


def missing_migrations(applied: set[int]) -> list[int]:
    return sorted({m.version for m in MIGRATIONS} - applied)


async def schema_problem(pool: asyncpg.Pool, schema: str) -> str | None:
    """Why this worker cannot use `schema` (not migrated, or behind), or None."""
    applied = await applied_migrations(pool)
    missing = missing_migrations(applied)
    if not applied:
        return f"schema {schema!r} has no migrations applied: run `iotflow migrate`"
    if missing:
        return f"schema {schema!r} lacks migrations {missing}: run `iotflow migrate`"
    return None
