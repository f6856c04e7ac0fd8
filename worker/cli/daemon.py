"""`iotflow run`, `iotflow migrate`, `iotflow config`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import orjson
import structlog

from worker.config import Settings
from worker.exit_codes import ExitCode


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    commands.add_parser("run", help="run the daemon").set_defaults(handler=run_daemon_command)
    commands.add_parser(
        "migrate",
        help="apply the schema to PostgreSQL (versioned, idempotent), Cassandra's keyspace and tables "
        "when timeseries.backend uses it, the Kafka topics when Kafka is used",
    ).set_defaults(handler=_migrate)
    commands.add_parser("config", help="print the effective settings (secrets included)").set_defaults(
        handler=_print_config
    )


def run_daemon_command(settings: Settings, args: argparse.Namespace) -> int:
    from worker.cli.app import config_error
    from worker.decode.codecs import CodecConfigError, load_codecs
    from worker.pipeline import run_daemon

    try:
        load_codecs(Path(settings.pipeline.codecs) if settings.pipeline.codecs else None)
    except CodecConfigError as exc:
        return config_error(f"pipeline.codecs: {exc}")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_daemon(settings))
    return uvloop.run(run_daemon(settings))


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from worker.cli.app import config_error
    from worker.stores.migrate import MigrationRefused, migrate

    try:
        asyncio.run(migrate(settings.postgres))
    except MigrationRefused as exc:
        return config_error(f"postgres.timescale: {exc}")
    if settings.timeseries.uses_cassandra:
        from worker.retry import describe, is_transient

        try:
            asyncio.run(_migrate_cassandra(settings))
        except Exception as exc:
            if not is_transient(exc):
                raise
            structlog.get_logger("worker.migrate").error(
                "cassandra.unavailable", error=describe(exc), hosts=settings.cassandra.hosts
            )
            return ExitCode.FAILURE
    _create_kafka_topics(settings)
    return ExitCode.OK


async def _migrate_cassandra(settings: Settings) -> None:
    from worker.stores.cassandra import CassandraStore
    from worker.stores.cassandra_schema import migrate_cassandra

    store = CassandraStore(settings.cassandra)
    try:
        await migrate_cassandra(store)
    finally:
        await store.close()


def _create_kafka_topics(settings: Settings) -> None:
    """The topics the bridge or Kafka intake use, with kafka.partitions and
    kafka.replication_factor; none when neither is configured."""
    from worker.stores.kafka import needed_topics

    topics = needed_topics(settings)
    if not topics:
        return
    from worker.stores.kafka import create_topics

    created = asyncio.run(create_topics(settings.kafka, topics))
    structlog.get_logger("worker.migrate").info(
        "kafka.topics", created=created, existing=sorted(set(topics) - set(created))
    )


def _print_config(settings: Settings, args: argparse.Namespace) -> int:
    print(orjson.dumps(dataclasses.asdict(settings), option=orjson.OPT_INDENT_2).decode())
    return ExitCode.OK
