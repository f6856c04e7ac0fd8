"""`iotflow migrate` for Cassandra: the keyspace and the three tables of schemas/cql/telemetry.cql.

The statements come from `schemas/cql/telemetry.cql`; every one is idempotent, so
migrate runs them all each time. The keyspace's replication is set when it is created
and only reported afterwards: changing it on a live cluster needs a repair, an
operator's decision (docs/storage.md).
"""

from __future__ import annotations

import re
from importlib import resources
from string import Template

import structlog

from worker.config import CassandraSettings
from worker.stores.cassandra import CassandraStore

log = structlog.get_logger("worker.stores.cassandra_schema")

TABLES = ("device_data", "user_data", "aggregated_data")


def replication_map(replication: str) -> dict[str, str]:
    """`3` → SimpleStrategy, factor 3; `dc1:3,dc2:2` → NetworkTopologyStrategy per data centre."""
    if replication.isdigit():
        return {"class": "SimpleStrategy", "replication_factor": replication}
    factors = dict(item.strip().rsplit(":", 1) for item in replication.split(","))
    return {"class": "NetworkTopologyStrategy", **factors}


def _cql_map(values: dict[str, str]) -> str:
    return "{" + ", ".join(f"'{key}': '{value}'" for key, value in values.items()) + "}"


def keyspace_statement(settings: CassandraSettings) -> str:
    return (
        f"CREATE KEYSPACE IF NOT EXISTS {settings.keyspace} "
        f"WITH replication = {_cql_map(replication_map(settings.replication))}"
    )


def table_statements(settings: CassandraSettings) -> list[str]:
    """The tables' statements, in order, without comments."""
    text = (resources.files("schemas") / "cql" / "telemetry.cql").read_text("utf-8")
    text = re.sub(r"--[^\n]*", "", text)
    text = Template(text).substitute(keyspace=settings.keyspace, default_ttl=settings.default_ttl_s)
    return [" ".join(statement.split()) for statement in text.split(";") if statement.strip()]


async def migrate_cassandra(store: CassandraStore) -> None:
    settings = store.settings
    await store.execute(keyspace_statement(settings))
    for statement in table_statements(settings):
        await store.execute(statement)
    rows = (
        await store.execute(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s", [settings.keyspace]
        )
    ).current_rows
    actual = dict(rows[0].replication) if rows else {}
    wanted = replication_map(settings.replication)
    if _normalised(actual) != _normalised(wanted):
        log.warning(
            "cassandra.replication_differs",
            keyspace=settings.keyspace,
            actual=actual,
            configured=wanted,
            hint="ALTER KEYSPACE … WITH replication = …, then nodetool repair (docs/storage.md)",
        )
    log.info("cassandra.migrated", keyspace=settings.keyspace, tables=list(TABLES))


def _normalised(replication: dict[str, str]) -> dict[str, str]:
    return {key: value.rsplit(".", 1)[-1] for key, value in replication.items()}


async def missing_tables(store: CassandraStore) -> list[str]:
    """The writer's tables the keyspace lacks (all of them when there is no keyspace)."""
    rows = (
        await store.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", [store.settings.keyspace]
        )
    ).current_rows
    return sorted(set(TABLES) - {row.table_name for row in rows})


async def schema_problem(store: CassandraStore) -> str:
    """What is missing for the writer, or "" when the keyspace has every table."""
    missing = await missing_tables(store)
    if missing:
        keyspace = store.settings.keyspace
        return f"Cassandra keyspace {keyspace} lacks {', '.join(missing)}: run `iotflow migrate`"
    return ""
