"""`iotflow run`, `iotflow migrate`, `iotflow config`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import structlog

from worker.config import Settings
from worker.exit_codes import ExitCode


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    run = commands.add_parser("run", help="run the daemon")
    run.add_argument(
        "--processes",
        type=_processes,
        default=None,
        metavar="N|auto",
        help="worker processes under one supervisor (default: runtime.processes)",
    )
    run.set_defaults(handler=run_daemon_command)
    commands.add_parser(
        "migrate",
        help="apply the schema to PostgreSQL (versioned, idempotent), MongoDB's indexes when it is the "
        "document store, Cassandra's keyspace and tables when timeseries.backend uses it, the Kafka "
        "topics when Kafka is used",
    ).set_defaults(handler=_migrate)
    commands.add_parser("config", help="print the effective settings (secrets included)").set_defaults(
        handler=_print_config
    )


def _processes(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of processes (1 or more) or auto")
    return int(value)


def run_daemon_command(settings: Settings, args: argparse.Namespace) -> int:
    from worker.cli.app import config_error, decode_files_error
    from worker.runtime import processes

    if (failed := decode_files_error(settings)) is not None:
        return failed
    count = processes.process_count(
        args.processes if args.processes is not None else settings.runtime.processes
    )
    problem = processes.group_problem(settings, count)
    if problem:
        return config_error(f"runtime.processes: {problem}")
    processes.warn_left_behind(settings, count)
    if count > 1:
        supervisor = processes.ProcessSupervisor(settings, count, processes.child_argv(args.config))
        return asyncio.run(supervisor.run())
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_run_one(settings, args.config))
    return uvloop.run(_run_one(settings, args.config))


async def _run_one(settings: Settings, config_file: Path | None) -> ExitCode:
    """The daemon in this process; as a child of `--processes`, tagged and tied to its parent."""
    import structlog

    from worker.config import load_settings
    from worker.logging import quiet_abandoned_connection_failures
    from worker.pipeline import Daemon
    from worker.runtime.garbage import tune_gc
    from worker.runtime.processes import CHILD_INDEX_ENV

    tune_gc()
    quiet_abandoned_connection_failures(asyncio.get_running_loop())
    daemon = Daemon(settings, load_settings=lambda: load_settings(config_file))
    index = os.environ.get(CHILD_INDEX_ENV)
    if index is not None:
        structlog.contextvars.bind_contextvars(process=int(index))
        _stop_when_parent_goes(daemon.request_stop)
    return await daemon.run()


def _stop_when_parent_goes(stop: Callable[[], None]) -> None:
    """The parent holds our stdin's other end and never writes: end of file means it is gone."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()

    def readable() -> None:
        if not os.read(fd, 4096):
            loop.remove_reader(fd)
            stop()

    loop.add_reader(fd, readable)


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from worker.cli.app import config_error
    from worker.stores.migrate import MigrationRefused, migrate

    try:
        asyncio.run(migrate(settings.postgres))
    except MigrationRefused as exc:
        return config_error(f"postgres.timescale: {exc}")
    if not _migrate_documents(settings) or not _migrate_cassandra(settings):
        return ExitCode.FAILURE
    _create_kafka_topics(settings)
    return ExitCode.OK


def _migrate_documents(settings: Settings) -> bool:
    """MongoDB's indexes when it is the document store; one line when it cannot be reached."""
    from worker.stores.migrate import migrate_documents

    if settings.documents.backend != "mongodb":
        return True
    from pymongo.errors import PyMongoError

    try:
        asyncio.run(migrate_documents(settings))
    except PyMongoError as exc:
        structlog.get_logger("worker.migrate").error(
            "migrate.mongodb_failed", error=" ".join(str(exc).split())
        )
        return False
    return True


def _migrate_cassandra(settings: Settings) -> bool:
    """Cassandra's keyspace and tables when timeseries.backend uses it; one line when unreachable."""
    if not settings.timeseries.uses_cassandra:
        return True
    from worker.retry import describe, is_transient

    try:
        asyncio.run(_create_cassandra_schema(settings))
    except Exception as exc:
        if not is_transient(exc):
            raise
        structlog.get_logger("worker.migrate").error(
            "cassandra.unavailable", error=describe(exc), hosts=settings.cassandra.hosts
        )
        return False
    return True


async def _create_cassandra_schema(settings: Settings) -> None:
    from worker.stores.cassandra import CassandraStore
    from worker.stores.cassandra_schema import migrate_cassandra

    store = CassandraStore(settings.cassandra)
    try:
        await migrate_cassandra(store)
    finally:
        await store.close()


def _create_kafka_topics(settings: Settings) -> None:
    """The topics the bridge or Kafka intake use, with kafka.partitions and
    kafka.replication_factor; none (and no Kafka client loaded) when neither is configured."""
    topics = settings.kafka_topics
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
