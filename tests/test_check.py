"""`iotflow check` against the suite's live PostgreSQL, Redis and Mosquitto: one line per
check, exit 0 when all pass, 1 naming what is unreachable or not migrated, 2 for the
configuration; every check runs, each within its bound, even when another fails."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import worker_env
from tests.helpers import iotflow_process, with_cassandra
from worker.config import Settings
from worker.stores.documents import MongoDocumentStore
from worker.tools.embedded import free_port


async def check(settings: Settings, **env: str) -> tuple[int, list[str]]:
    async with iotflow_process({**worker_env(settings), **env}, "check") as process:
        code = await process.wait(timeout=60)
        return code, process.output.strip().splitlines()


def line_of(lines: list[str], name: str) -> str:
    found = [line for line in lines if line.split()[0] == name]
    assert len(found) == 1, lines
    return found[0]


async def test_all_good_exits_0_with_one_line_each(settings: Settings) -> None:
    code, lines = await check(settings)
    assert code == 0, lines
    assert [line.split()[0] for line in lines] == ["config", "postgres", "redis", "mqtt"]
    assert line_of(lines, "postgres").split()[1] == "reachable"
    assert "PostgreSQL" in line_of(lines, "postgres")
    assert f"migrated (schema {settings.postgres.schema}" in line_of(lines, "postgres")
    assert line_of(lines, "redis").split()[1] == "reachable"
    assert line_of(lines, "mqtt").split()[1] == "reachable"


async def test_a_closed_port_exits_1_naming_the_store(settings: Settings) -> None:
    port = free_port()  # nothing listens there
    code, lines = await check(settings, IOTFLOW_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    assert code == 1, lines
    assert line_of(lines, "redis").split()[1:] == [
        "unreachable",
        f"127.0.0.1:{port}:",
        "connection",
        "refused",
    ]
    assert line_of(lines, "postgres").split()[1] == "reachable"  # the others are still checked
    assert line_of(lines, "mqtt").split()[1] == "reachable"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


async def test_a_server_that_never_answers_is_reported_within_its_bound(
    settings: Settings, silent_port: int
) -> None:
    code, lines = await check(
        settings, IOTFLOW_POSTGRES_URL=f"postgresql://iotflow@127.0.0.1:{silent_port}/x"
    )
    assert code == 1, lines
    assert line_of(lines, "postgres").split()[1] == "unreachable"
    assert "no answer within" in line_of(lines, "postgres")
    assert line_of(lines, "redis").split()[1] == "reachable"


async def test_a_server_refusing_us_is_reported_in_its_own_words(settings: Settings) -> None:
    database = f"no_such_db_{uuid.uuid4().hex[:8]}"
    url = urlunsplit(urlsplit(settings.postgres.url)._replace(path=f"/{database}"))
    code, lines = await check(settings, IOTFLOW_POSTGRES_URL=url)
    assert code == 1, lines
    postgres = line_of(lines, "postgres")
    assert postgres.split()[1] == "refused" and f'database "{database}" does not exist' in postgres, lines


async def test_an_unmigrated_schema_exits_1_saying_run_migrate(settings: Settings) -> None:
    schema = f"test_unmigrated_{uuid.uuid4().hex[:8]}"  # never created
    code, lines = await check(settings, IOTFLOW_POSTGRES_SCHEMA=schema)
    assert code == 1, lines
    postgres = line_of(lines, "postgres")
    assert postgres.split()[1] == "reachable"
    assert f"not migrated, run `iotflow migrate` (schema {schema}: no migrations applied)" in postgres


async def test_a_bad_configuration_exits_2_with_one_line(settings: Settings) -> None:
    code, lines = await check(settings, IOTFLOW_POSTGRES_URL="not-a-url")
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("iotflow: configuration error: postgres.url"), lines


async def migrate(env: dict[str, str]) -> None:
    async with iotflow_process(env, "migrate") as process:
        assert await process.wait(timeout=120) == 0, process.output[-3000:]


async def check_then_migrate_then_check(settings: Settings, name: str, lacking: str, **env: str) -> None:
    """Not migrated (exit 1, the line says what is missing), then `iotflow migrate`, then all good."""
    code, lines = await check(settings, **env)
    assert code == 1, lines
    line = line_of(lines, name)
    assert line.split()[1] == "reachable", lines
    assert "not migrated, run `iotflow migrate`" in line and lacking in line, line
    await migrate({**worker_env(settings), **env})
    code, lines = await check(settings, **env)
    assert code == 0, lines
    assert "migrated (" in line_of(lines, name) and "not migrated" not in line_of(lines, name)


async def test_kafka_topics_missing_then_created(settings: Settings, kafka_bootstrap: str) -> None:
    tag = uuid.uuid4().hex[:8]
    env = {
        "IOTFLOW_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "IOTFLOW_KAFKA_BRIDGE": "true",
        "IOTFLOW_KAFKA_RAW_TOPIC": f"raw-check-{tag}",
        "IOTFLOW_KAFKA_PROCESSED_TOPIC": f"processed-check-{tag}",
    }
    await check_then_migrate_then_check(settings, "kafka", f"raw-check-{tag}", **env)


async def test_mongodb_indexes_missing_then_created(settings: Settings, mongodb_url: str) -> None:
    database = f"iotflow_check_{uuid.uuid4().hex[:8]}"
    env = {
        "IOTFLOW_DOCUMENTS_BACKEND": "mongodb",
        "IOTFLOW_DOCUMENTS_MONGODB_URL": mongodb_url,
        "IOTFLOW_DOCUMENTS_MONGODB_DATABASE": database,
    }
    try:
        await check_then_migrate_then_check(settings, "mongodb", "has none of its indexes", **env)
    finally:
        store = MongoDocumentStore(
            replace(settings.documents, mongodb_url=mongodb_url, mongodb_database=database)
        )
        try:
            await store.drop_database()
        finally:
            await store.close()


async def test_cassandra_tables_missing_then_created(settings: Settings, cassandra_hosts: str) -> None:
    cassandra = with_cassandra(settings, cassandra_hosts, "both").cassandra
    env = {
        "IOTFLOW_TIMESERIES_BACKEND": "both",
        "IOTFLOW_CASSANDRA_HOSTS": ",".join(cassandra.hosts),
        "IOTFLOW_CASSANDRA_PORT": str(cassandra.port),
        "IOTFLOW_CASSANDRA_KEYSPACE": cassandra.keyspace,
        "IOTFLOW_CASSANDRA_LOCAL_DC": cassandra.local_dc,
    }
    await check_then_migrate_then_check(settings, "cassandra", "device_data", **env)
