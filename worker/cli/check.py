"""`iotflow check`: can this configuration run here? The settings (app.py has loaded them:
a configuration error has exited 2 already), then each configured store and the broker.

One line each: the name, reachable or not (and why, in a few words), the server's version,
and whether its schema is migrated. The checks run at once, each within `TIMEOUT_S`, so a
server that does not answer delays none of the others and each is reported. Exit 0 when
every check passes, 1 when something is unreachable, refuses us or is not migrated.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlparse, urlsplit, urlunsplit

from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.logging import configure_logging
from worker.retry import Refused, refusal

CONNECT_TIMEOUT_S = 3.0  # each connection's own timeout
TIMEOUT_S = 5.0  # a whole check: connect, ask, close
VERSION_WAIT_S = 1.0  # for the broker's retained $SYS/broker/version (Mosquitto publishes it)
NOT_MIGRATED = "not migrated, run `iotflow migrate`"


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    commands.add_parser(
        "check",
        help="check the configuration, then each configured store and the broker: reachable, "
        "version, migrated (exit 0 all fine, 1 something is not, 2 configuration)",
    ).set_defaults(handler=_check)


@dataclass(frozen=True)
class Found:
    """What a reachable server said."""

    version: str
    schema: str = ""  # "migrated (…)", NOT_MIGRATED + why, or "" where nothing is migrated
    migrated: bool = True


@dataclass(frozen=True)
class Line:
    name: str
    state: str  # reachable, unreachable, refused; valid for the configuration
    detail: str = ""  # the version, or why it is not reachable
    schema: str = ""
    ok: bool = True


Probe = Callable[[Settings], Awaitable[Found]]


def _check(settings: Settings, args: argparse.Namespace) -> int:
    from worker.cli.app import decode_files_error

    if (failed := decode_files_error(settings)) is not None:
        return failed
    # The lines are the report; a driver's info lines would only interleave with them.
    configure_logging("warning", settings.log.format)
    lines = [Line("config", "valid", str(args.config or ""))]
    lines += asyncio.run(run_checks(settings))
    print_lines(lines)
    return ExitCode.OK if all(line.ok for line in lines) else ExitCode.FAILURE


def probes(settings: Settings) -> list[tuple[str, str, Probe]]:
    """(name, where, probe) of every server this configuration uses."""
    found: list[tuple[str, str, Probe]] = [
        ("postgres", _where(settings.postgres.url, 5432), _postgres),
        ("redis", _where(settings.redis.url, 6379), _redis),
    ]
    if settings.documents.backend == "mongodb":
        found.append(("mongodb", _where(settings.documents.mongodb_url, 27017), _mongodb))
    if settings.timeseries.uses_cassandra:
        cassandra = settings.cassandra
        found.append(("cassandra", ",".join(f"{h}:{cassandra.port}" for h in cassandra.hosts), _cassandra))
    if settings.kafka_topics:
        found.append(("kafka", settings.kafka.bootstrap, _kafka))
    if settings.intake.source == "mqtt":
        default = 8883 if urlparse(settings.mqtt.url).scheme == "mqtts" else 1883
        found.append(("mqtt", _where(settings.mqtt.url, default), _mqtt))
    return found


async def run_checks(settings: Settings) -> list[Line]:
    return list(
        await asyncio.gather(*(_run(name, where, probe, settings) for name, where, probe in probes(settings)))
    )


async def _run(name: str, where: str, probe: Probe, settings: Settings) -> Line:
    bound = asyncio.timeout(TIMEOUT_S)
    try:
        async with bound:
            found = await probe(settings)
    except Exception as exc:  # whatever a driver raises is this check's answer, not a crash
        refused = refusal(exc)
        if bound.expired():
            why = f"no answer within {TIMEOUT_S:g} s"
        elif refused is not None:  # credentials, a database or an ACL: its own words
            why = _shortened(" ".join(str(refused).split()) or type(refused).__name__)
        else:
            why = reason(exc)
        return Line(name, "unreachable" if refused is None else "refused", f"{where}: {why}", ok=False)
    return Line(name, "reachable", found.version, found.schema, ok=found.migrated)


def reason(exc: BaseException) -> str:
    """A few words for why a connection failed, from the error or those it wraps."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, TimeoutError):
            return f"no answer within {CONNECT_TIMEOUT_S:g} s"
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "unknown host"
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(exc).split()) or type(exc).__name__
    # Drivers that keep the socket's error in their own text (asyncpg trying several addresses,
    # redis, pymongo, the Cassandra driver).
    for words, short in (
        ("refused", "connection refused"),
        ("Connect call failed", "connection refused"),
        ("Unable to bootstrap", "no broker answered"),  # aiokafka
        ("Name or service not known", "unknown host"),
    ):
        if words in text:
            return short
    return _shortened(text)


def _shortened(text: str) -> str:
    return text if len(text) <= 160 else text[:157] + "…"


def print_lines(lines: list[Line]) -> None:
    widths = [max(len(getattr(line, column)) for line in lines) for column in ("name", "state", "detail")]
    for line in lines:
        cells = (line.name, line.state, line.detail)
        text = "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        print(f"{text}  {line.schema}".rstrip(), flush=True)


def _where(url: str, default_port: int) -> str:
    parsed = urlparse(url)
    return f"{parsed.hostname or '127.0.0.1'}:{parsed.port or default_port}"


# --- the probes: each connects, asks, closes; raises when it cannot -----------------------------------


async def _postgres(settings: Settings) -> Found:
    from worker.stores.migrate import applied_migrations, missing_migrations
    from worker.stores.postgres import connect

    conn = await connect(settings.postgres, timeout=CONNECT_TIMEOUT_S)
    try:
        server = str(await conn.fetchval("SHOW server_version")).split()[0]
        timescale = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
        applied = await applied_migrations(conn)
    finally:
        await conn.close()
    version = f"PostgreSQL {server}" + (f", TimescaleDB {timescale}" if timescale else "")
    schema = settings.postgres.schema
    missing = missing_migrations(applied)
    if not applied:
        return Found(version, f"{NOT_MIGRATED} (schema {schema}: no migrations applied)", migrated=False)
    if missing:
        lacks = ", ".join(str(number) for number in missing)
        return Found(version, f"{NOT_MIGRATED} (schema {schema} lacks migrations {lacks})", migrated=False)
    return Found(version, f"migrated (schema {schema}, version {max(applied)})")


async def _redis(settings: Settings) -> Found:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(
        settings.redis.url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S
    )
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    if info.get("server_name") == "valkey":
        return Found(f"Valkey {info.get('valkey_version', info.get('redis_version', '?'))}")
    return Found(f"Redis {info.get('redis_version', '?')}")


async def _mqtt(settings: Settings) -> Found:
    from worker.intake.mqtt import REFUSING_CONNACKS, connect
    from worker.intake.mqtt_protocol import ConnectRefused

    # A clean session under a client id of its own: the daemon's persistent one is left alone.
    client_id = f"{settings.mqtt.client_id}-check-{os.getpid()}"
    try:
        connection = await connect(settings.mqtt, client_id, persistent=False, timeout=CONNECT_TIMEOUT_S)
    except ConnectRefused as exc:
        if exc.code in REFUSING_CONNACKS:  # credentials or an ACL, not an outage
            raise Refused(str(exc)) from exc
        raise
    try:
        codes = await connection.subscribe(["$SYS/broker/version"], qos=0)
        version = "version not published"
        if codes and codes[0] < 0x80:
            try:
                async with asyncio.timeout(VERSION_WAIT_S):
                    packets = await connection.take()
                version = packets[0].payload.decode(errors="replace")
            except TimeoutError:
                pass
    finally:
        await connection.close(timeout=1.0)
    return Found(version)


async def _mongodb(settings: Settings) -> Found:
    from schemas.mongo import mongo_indexes
    from worker.stores.documents import MongoDocumentStore
    from worker.stores.migrate import server_name

    jobs = settings.jobs
    # An index with an `instead` may be refused by the server (FerretDB): only the others must exist.
    wanted = [
        index
        for index in mongo_indexes(jobs.retention_event_logs_days, jobs.retention_resolved_alerts_days)
        if not index.instead
    ]
    store = MongoDocumentStore(
        replace(settings.documents, mongodb_url=_short_timeouts(settings.documents.mongodb_url))
    )
    try:
        version = server_name(await store.server_info())
        have = {c: await store.indexes(c) for c in {index.collection for index in wanted}}
    finally:
        await store.close()
    missing = [index.name for index in wanted if index.name not in have[index.collection]]
    database = settings.documents.mongodb_database
    if missing:
        lacks = "has none of its indexes" if len(missing) == len(wanted) else f"lacks {', '.join(missing)}"
        return Found(version, f"{NOT_MIGRATED} (database {database} {lacks})", migrated=False)
    return Found(version, f"migrated (database {database}, {len(wanted)} indexes)")


def _short_timeouts(url: str) -> str:
    """`url` with the check's timeouts for what it does not set itself: PyMongo's would wait
    for a server for 10 s, and report a refused connection only then."""
    parts = urlsplit(url)
    query = parts.query
    milliseconds = int(CONNECT_TIMEOUT_S * 1000)
    for option in ("serverSelectionTimeoutMS", "connectTimeoutMS"):
        if option.lower() not in query.lower():
            query += f"{'&' if query else ''}{option}={milliseconds}"
    return urlunsplit(parts._replace(path=parts.path or "/", query=query))


async def _cassandra(settings: Settings) -> Found:
    from worker.stores.cassandra import CassandraStore
    from worker.stores.cassandra_schema import missing_tables

    store = CassandraStore(
        replace(settings.cassandra, connect_timeout_s=CONNECT_TIMEOUT_S, request_timeout_s=CONNECT_TIMEOUT_S)
    )
    try:
        rows = (await store.execute("SELECT release_version FROM system.local")).current_rows
        missing = await missing_tables(store)
    finally:
        await store.close()
    version = f"Cassandra {rows[0].release_version}" if rows else "Cassandra"
    keyspace = settings.cassandra.keyspace
    if missing:
        lacks = ", ".join(missing)
        return Found(version, f"{NOT_MIGRATED} (keyspace {keyspace} lacks {lacks})", migrated=False)
    return Found(version, f"migrated (keyspace {keyspace})")


async def _kafka(settings: Settings) -> Found:
    from worker.stores.kafka import describe_cluster

    # aiokafka logs each failed connection as an error of its own; this check's line says it.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    brokers, topics = await describe_cluster(settings.kafka, CONNECT_TIMEOUT_S)
    # Kafka's protocol does not say the server's version: the cluster's size instead.
    version = f"Kafka, {brokers} broker{'s' if brokers != 1 else ''}"
    missing = [topic for topic in settings.kafka_topics if topic not in topics]
    if missing:
        return Found(version, f"{NOT_MIGRATED} (topics {', '.join(missing)} missing)", migrated=False)
    return Found(version, f"migrated (topics {', '.join(settings.kafka_topics)})")
