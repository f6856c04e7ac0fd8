"""Fixtures: real PostgreSQL, Redis and MQTT for every integration test; real Cassandra,
Kafka, a MongoDB-protocol server (FerretDB) and a second MQTT 5 broker (HiveMQ CE) and
Alertmanager for the tests that ask for them.

Services come from IOTFLOW_TEST_POSTGRES_URL / IOTFLOW_TEST_REDIS_URL /
IOTFLOW_TEST_MQTT_URL / IOTFLOW_TEST_CASSANDRA_HOSTS / IOTFLOW_TEST_KAFKA_BOOTSTRAP /
IOTFLOW_TEST_MONGODB_URL / IOTFLOW_TEST_HIVEMQ_URL when set; whatever is not set is started for the session
(worker.tools.embedded, worker.tools.servers), so a fresh machine needs nothing running.
Where a server cannot be had (no java, mvn or go), its tests skip saying what to install,
and fail under CI=true. Each test gets its own PostgreSQL schema, Redis key prefix, MQTT
client id, Cassandra keyspace, Kafka topics and group, and MongoDB database. Tests
that leave messages waiting in the broker keep them below a stock Mosquitto's
`max_queued_messages` (1000), so an external broker needs no special settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import asyncpg
import pytest
import redis.asyncio as aioredis

from worker.config import Settings
from worker.logging import configure_logging
from worker.ops.certs import CertStore
from worker.rules.admin import RuleAdmin, open_admin
from worker.stores import Stores, open_stores
from worker.stores.migrate import migrate
from worker.stores.redis import delete_matching
from worker.tools.embedded import EmbeddedServices, ServiceUrls
from worker.tools.servers import (
    AlertmanagerServer,
    CassandraServer,
    FerretDBServer,
    HiveMQServer,
    KafkaServer,
    ServerProcess,
    ServerUnavailable,
)
from worker.tools.servers.keystore import TlsIdentity, write_pkcs12
from worker.tools.simulate import register_fleet

configure_logging("warning", "console")

# Which tests share a worker when ./scripts/test spreads the suite over two (pytest-xdist).
pytest_plugins = ("tests.xdist_groups",)

# Threads that outlive their work by design: the event loop's executor, asyncio's child
# watchers (one per subprocess, ending just after it is reaped) and cassandra-driver's
# libev reactor (one per process, started by the first connection, never stopped).
_POOLED_THREADS = ("asyncio_", "waitpid-", "event_loop")

Server = TypeVar("Server", bound=ServerProcess)
# The servers of the session (started by the first test that needs one, kept to the end).
_session_servers: list[ServerProcess] = []


def _children() -> set[int]:
    """This process's child processes, zombies included (a child killed but never reaped)."""
    found = set()
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2 :].split()[1] == me:
                found.add(int(entry))
    return found


def _awaiting(task: asyncio.Task[Any]) -> str:
    """Where a task is suspended: each coroutine down its await chain, as file:line."""
    places = []
    awaited: Any = task.get_coro()
    while awaited is not None and getattr(awaited, "cr_frame", None) is not None:
        frame = awaited.cr_frame
        places.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}")
        awaited = awaited.cr_await
    return " > ".join(places) or "?"


@pytest.fixture(autouse=True)
async def nothing_left_running() -> AsyncIterator[None]:
    """Every test stops what it starts: after its own fixtures are done, no task, thread or
    child process of its making may still run (the suite shares one loop and one broker)."""
    tasks = asyncio.all_tasks()
    threads = set(threading.enumerate())
    children = _children()
    yield
    me = asyncio.current_task()
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # what is being cancelled gets a moment to finish
        left = {t for t in asyncio.all_tasks() - tasks if t is not me and not t.done()}
        if not left or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.01)
    new_threads = [
        t
        for t in set(threading.enumerate()) - threads
        if t.is_alive() and not t.name.startswith(_POOLED_THREADS)
    ]
    new_children = _children() - children - {server.pid for server in _session_servers}
    for task in left:
        task.cancel()
    for pid in new_children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(os.waitpid, pid, 0)
    problems = [f"task {t.get_coro()!r} waiting at {_awaiting(t)}" for t in left]
    problems += [f"thread {t.name!r}" for t in new_threads]
    problems += [f"child process {pid}" for pid in new_children]
    if problems:
        pytest.fail("the test left running: " + ", ".join(problems), pytrace=False)


class _UnretrievedExceptions(logging.Handler):
    """Keeps asyncio's "Future/Task exception was never retrieved" reports: each is a failure
    nobody heard of, logged only when the future is collected."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "exception was never retrieved" in message:
            self.found.append(
                message.splitlines()[0] + (f": {record.exc_info[1]!r}" if record.exc_info else "")
            )


_unretrieved = _UnretrievedExceptions()
logging.getLogger("asyncio").addHandler(_unretrieved)


@pytest.fixture(autouse=True)
def no_unretrieved_exceptions() -> Iterator[None]:
    """A test fails if a future or task of its making ended in an exception nobody awaited."""
    yield
    gc.collect()  # such a report is made when the future is collected
    found, _unretrieved.found[:] = list(_unretrieved.found), []
    if found:
        pytest.fail("asyncio: " + "; ".join(found), pytrace=False)


@contextlib.contextmanager
def services_dir(name: str) -> Iterator[Path]:
    """A fresh directory for embedded services, removed afterwards; not under pytest's
    basetemp: every pytest session started by the same user, in any checkout, resets
    /tmp/pytest-of-<user> to mode 0700, and under root the user PostgreSQL runs as then
    loses its way to its data directory (initdb or a start fails)."""
    with tempfile.TemporaryDirectory(prefix=f"iotflow-{name}-", ignore_cleanup_errors=True) as path:
        yield Path(path)


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """Like tmp_path, for embedded services (see services_dir)."""
    with services_dir("test") as path:
        yield path


@pytest.fixture(scope="session")
def service_urls() -> Iterator[ServiceUrls]:
    given = {
        "postgres": os.environ.get("IOTFLOW_TEST_POSTGRES_URL", ""),
        "redis": os.environ.get("IOTFLOW_TEST_REDIS_URL", ""),
        "mqtt": os.environ.get("IOTFLOW_TEST_MQTT_URL", ""),
    }
    missing = {name: not url for name, url in given.items()}
    if not any(missing.values()):
        yield ServiceUrls(given["postgres"], given["redis"], given["mqtt"])
        return
    with services_dir("services") as root, EmbeddedServices(root, **missing) as services:
        urls = services.urls
        yield ServiceUrls(
            given["postgres"] or urls.postgres_url,
            given["redis"] or urls.redis_url,
            given["mqtt"] or urls.mqtt_url,
        )


def make_settings(urls: ServiceUrls, tag: str) -> Settings:
    settings = Settings()
    settings.mqtt = replace(
        settings.mqtt, url=urls.mqtt_url, client_id=f"iotflow-test-{tag}", session_expiry_s=120
    )
    settings.postgres = replace(settings.postgres, url=urls.postgres_url, schema=f"test_{tag}")
    settings.redis = replace(settings.redis, url=urls.redis_url, key_prefix=f"test:{tag}:")
    settings.pipeline = replace(settings.pipeline, flush_interval_ms=50)
    settings.runtime = replace(settings.runtime, report_interval_s=3600, restart_backoff_s=0.1)
    settings.http = replace(settings.http, enabled=False)
    return settings


@pytest.fixture
async def settings(service_urls: ServiceUrls) -> AsyncIterator[Settings]:
    """Migrated, isolated settings; the schema and keys are dropped afterwards."""
    tag = uuid.uuid4().hex[:10]
    result = make_settings(service_urls, tag)
    await migrate(result.postgres)
    await register_fleet(result.postgres)
    yield result
    conn = await asyncpg.connect(service_urls.postgres_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{result.postgres.schema}" CASCADE')
    finally:
        await conn.close()
    # Tests may point `result` at a proxy of their own: clean up through the real service.
    await delete_matching(replace(result.redis, url=service_urls.redis_url), f"{result.redis.key_prefix}*")


@pytest.fixture
async def stores(settings: Settings) -> AsyncIterator[Stores]:
    async with open_stores(settings) as opened:
        yield opened


@pytest.fixture
async def pg(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    from worker.stores.postgres import connect

    conn = await connect(settings.postgres)
    yield conn
    await conn.close()


async def is_hypertable(conn: asyncpg.Connection) -> bool:
    """`decoded_data` of the connection's schema is a TimescaleDB hypertable (the test database
    has the extension, preloaded: `iotflow migrate` then makes one)."""
    if not await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"):
        return False
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM _timescaledb_catalog.hypertable "
            "WHERE schema_name = current_schema() AND table_name = 'decoded_data'"
        )
    )


@pytest.fixture
async def hypertable(pg: asyncpg.Connection) -> None:
    """Skips the test unless the test database is a TimescaleDB (see docs/operations.md)."""
    if not await is_hypertable(pg):
        pytest.skip("needs TimescaleDB: the test database has no timescaledb extension (preloaded)")


@pytest.fixture
async def partitioned(pg: asyncpg.Connection) -> None:
    """Skips the test where `decoded_data` is a TimescaleDB hypertable, not range partitions."""
    if await is_hypertable(pg):
        pytest.skip("needs native range partitions: decoded_data is a TimescaleDB hypertable here")


@pytest.fixture
async def admin(settings: Settings) -> AsyncIterator[RuleAdmin]:
    """The rules' admin (what `iotflow rules` uses), on the test's schema."""
    async with open_admin(settings) as opened:
        yield opened


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis.url, decode_responses=True)
    yield client
    await client.aclose()


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment for `python -m worker` with these settings."""
    env = dict(os.environ)
    env.update(
        IOTFLOW_MQTT_URL=settings.mqtt.url,
        IOTFLOW_MQTT_CLIENT_ID=settings.mqtt.client_id,
        IOTFLOW_MQTT_SESSION_EXPIRY_S=str(settings.mqtt.session_expiry_s),
        IOTFLOW_POSTGRES_URL=settings.postgres.url,
        IOTFLOW_POSTGRES_SCHEMA=settings.postgres.schema,
        IOTFLOW_REDIS_URL=settings.redis.url,
        IOTFLOW_REDIS_KEY_PREFIX=settings.redis.key_prefix,
        IOTFLOW_PIPELINE_FLUSH_INTERVAL_MS=str(settings.pipeline.flush_interval_ms),
        IOTFLOW_HTTP_ENABLED="false",
        IOTFLOW_LOG_FORMAT="json",
    )
    return env


def cassandra_worker_env(settings: Settings) -> dict[str, str]:
    """`worker_env` with readings in these settings' Cassandra."""
    c = settings.cassandra
    return {
        **worker_env(settings),
        "IOTFLOW_TIMESERIES_BACKEND": "cassandra",
        "IOTFLOW_CASSANDRA_HOSTS": ",".join(c.hosts),
        "IOTFLOW_CASSANDRA_PORT": str(c.port),
        "IOTFLOW_CASSANDRA_KEYSPACE": c.keyspace,
        "IOTFLOW_CASSANDRA_CONSISTENCY": c.consistency,
        "IOTFLOW_CASSANDRA_LOCAL_DC": c.local_dc,
    }


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose server this machine cannot run, saying what to install; under CI
    (CI=true) fail instead: CI must prove every server ran."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def _session_server(make: Callable[[Path], Server], name: str) -> Iterator[Server]:
    """One server of the suite's own for the whole session, killed at its end: its data goes
    with its directory, and a graceful stop (Cassandra's drain) would only add seconds."""
    with services_dir(name) as directory:
        try:
            server = make(directory)
        except ServerUnavailable as exc:
            unavailable(f"{name}: {exc}")
        server.start()
        _session_servers.append(server)
        try:
            yield server
        finally:
            _session_servers.remove(server)
            server.kill()


@pytest.fixture(scope="session")
def cassandra_server() -> Iterator[CassandraServer]:
    """The suite's own Cassandra 5.0 node (tests that kill and restart it ask for this one).
    Its commit log is synced before each acknowledgement: with Cassandra's default (periodic,
    10 s) a kill -9 of the one node loses writes it acknowledged, which a test of the worker's
    recovery must not mistake for the worker's loss (docs/storage.md)."""
    with _session_server(partial(CassandraServer, durable_acks=True), "cassandra") as server:
        yield server


@pytest.fixture(scope="session")
def store_certs() -> Iterator[CertStore]:
    """The project's own CA (`iotflow certs`) for the secured Kafka and Cassandra: a server
    certificate for 127.0.0.1 (`server`, also as a PKCS12 keystore) and a client's (`iotflow-worker`)."""
    with services_dir("store-certs") as directory:
        certs = CertStore(directory)
        certs.init()
        certs.broker("127.0.0.1", sans=["localhost"])
        certs.client("iotflow-worker")
        yield certs


@pytest.fixture(scope="session")
def store_tls(store_certs: CertStore) -> TlsIdentity:
    keystore = write_pkcs12(
        store_certs.cert_path("server"),
        store_certs.key_path("server"),
        store_certs.dir / "server.p12",
        "changeit",
    )
    return TlsIdentity(keystore, "changeit", store_certs.cert_path("ca"))


# The SASL user of the suite's Kafka (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512): a password that
# is this session's own, so that a test can look for it in every log line and answer.
KAFKA_USER = "iotflow"
KAFKA_PASSWORD = f"kafka-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def secured_cassandra_server(store_tls: TlsIdentity) -> Iterator[CassandraServer]:
    """A Cassandra node of its own with logins (PasswordAuthenticator) and client encryption
    (optional: plain and TLS on one port): the authenticator is the whole node's, and the suite's
    other Cassandra tests log in to none. Started only by the tests that ask for it."""

    def make(directory: Path) -> CassandraServer:
        server = CassandraServer(directory, tls=store_tls)
        server.heap = "768m"
        return server

    with _session_server(make, "secured-cassandra") as server:
        yield server


@pytest.fixture(scope="session")
def cassandra_hosts(request: pytest.FixtureRequest) -> str:
    """IOTFLOW_TEST_CASSANDRA_HOSTS (host[:port],…), or the suite's own node's."""
    given = os.environ.get("IOTFLOW_TEST_CASSANDRA_HOSTS", "")
    return given or request.getfixturevalue("cassandra_server").hosts


@pytest.fixture(scope="session")
def kafka_server(store_tls: TlsIdentity) -> Iterator[KafkaServer]:
    """The suite's own Kafka 4 KRaft node (tests that kill and restart it ask for this one),
    with its secured listeners beside the plain one (SASL_SSL for KAFKA_USER, and MTLS)."""
    make = partial(KafkaServer, tls=store_tls, users={KAFKA_USER: KAFKA_PASSWORD})
    with _session_server(make, "kafka") as server:
        yield server


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """IOTFLOW_TEST_KAFKA_BOOTSTRAP, or the suite's own Kafka's (each test uses topics and
    a group of its own)."""
    given = os.environ.get("IOTFLOW_TEST_KAFKA_BOOTSTRAP", "")
    return given or request.getfixturevalue("kafka_server").bootstrap


@pytest.fixture(scope="session")
def ferretdb_server() -> Iterator[FerretDBServer]:
    """The suite's own FerretDB 1.24 (tests of what it refuses ask for this one, whatever
    IOTFLOW_TEST_MONGODB_URL names)."""
    with _session_server(FerretDBServer, "ferretdb") as server:
        yield server


@pytest.fixture(scope="session")
def alertmanager_server() -> Iterator[AlertmanagerServer]:
    """The suite's own Prometheus Alertmanager (Debian's package), ready at /-/ready."""
    with _session_server(AlertmanagerServer, "alertmanager") as server:
        yield server


@pytest.fixture(scope="session")
def mongodb_url(request: pytest.FixtureRequest) -> str:
    """IOTFLOW_TEST_MONGODB_URL, or the suite's own FerretDB's (each test uses a database of
    its own)."""
    given = os.environ.get("IOTFLOW_TEST_MONGODB_URL", "")
    return given or request.getfixturevalue("ferretdb_server").url


@pytest.fixture(scope="session")
def hivemq_server() -> Iterator[HiveMQServer]:
    """The suite's own HiveMQ CE (tests that restart the broker ask for this one)."""
    with _session_server(HiveMQServer, "hivemq") as server:
        yield server


@pytest.fixture(params=["mosquitto", "hivemq"])
def mqtt_url(request: pytest.FixtureRequest, service_urls: ServiceUrls) -> str:
    """The MQTT 5 broker a contract test of intake runs against, each in turn: the suite's
    Mosquitto (IOTFLOW_TEST_MQTT_URL), then HiveMQ CE (IOTFLOW_TEST_HIVEMQ_URL, or its own)."""
    if request.param == "mosquitto":
        return service_urls.mqtt_url
    given = os.environ.get("IOTFLOW_TEST_HIVEMQ_URL", "")
    return given or request.getfixturevalue("hivemq_server").url


@pytest.fixture
def broker_settings(settings: Settings, mqtt_url: str) -> Settings:
    """`settings` on the broker of `mqtt_url`."""
    settings.mqtt = replace(settings.mqtt, url=mqtt_url)
    return settings
