"""PostgreSQL, Redis and MongoDB (FerretDB) over verified TLS with a password, on real servers
(worker/tools/servers/secured.py) with certificates from the project's CA.

With the right credentials the daemon, the jobs and the commands move data through them;
the passwords come from `…_file` settings, relative ones from `$CREDENTIALS_DIRECTORY`
(systemd's LoadCredential=), and appear in no log line, metric or /readyz body. A wrong
password or a CA that did not sign the server's certificate is a refusal: exit 2 and one
line naming the store and the setting to check, never a wait for the store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from worker.config import Settings
from worker.ops.certs import CertStore
from worker.stores.migrate import migrate
from worker.stores.postgres import connect
from worker.tools.embedded import free_port
from worker.tools.servers.secured import (
    SecuredFerretDBServer,
    SecuredPostgresServer,
    SecuredRedisServer,
    server_pki,
)
from worker.tools.simulate import register_fleet

from .conftest import _session_server, services_dir, worker_env
from .helpers import iotflow_process, publish, wait_for, wait_for_count, worker_process
from .test_outages import json_messages

# Characters a URL must escape: the password files hold them as they are.
PG_PASSWORD = "pg:s3cr/t@%-Секрет"
REDIS_PASSWORD = "rd:s3cr/t@%-пароль"
MONGO_PASSWORD = "mg:s3cr/t@%-salasana"
SECRETS = tuple(
    form
    for password in (PG_PASSWORD, REDIS_PASSWORD, MONGO_PASSWORD)
    for form in (password, quote(password, safe=""))
)
TIMEOUT_S = 60.0  # generous: the verdicts are exit codes and rows, not how fast they came
ROWS = "SELECT count(*) FROM decoded_data"

# Module-scoped servers: on one worker only (tests/xdist_groups.py).
pytestmark = pytest.mark.shares("secured-stores")


@dataclass(frozen=True)
class Secured:
    pki: CertStore
    stranger: CertStore  # a CA that signed nothing these servers hold
    postgres: SecuredPostgresServer
    redis: SecuredRedisServer


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    with services_dir("secured-pki") as root:
        pki = server_pki(root / "pki")
        stranger = CertStore(root / "stranger")
        stranger.init(days=30)
        postgres = partial(SecuredPostgresServer, pki=pki, password=PG_PASSWORD)
        redis = partial(SecuredRedisServer, pki=pki, password=REDIS_PASSWORD)
        with (
            _session_server(postgres, "secured-postgres") as pg_server,
            _session_server(redis, "secured-redis") as redis_server,
        ):
            yield Secured(pki, stranger, pg_server, redis_server)


@pytest.fixture(scope="module")
def secured_mongodb(secured: Secured) -> Iterator[SecuredFerretDBServer]:
    make = partial(SecuredFerretDBServer, pki=secured.pki, password=MONGO_PASSWORD)
    with _session_server(make, "secured-ferretdb") as server:
        yield server


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    """A stand-in for systemd's $CREDENTIALS_DIRECTORY, holding both passwords."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "postgres-password").write_text(PG_PASSWORD + "\n")
    (directory / "redis-password").write_text(REDIS_PASSWORD + "\n")
    (directory / "mongodb-password").write_text(MONGO_PASSWORD + "\n")
    return directory


@pytest.fixture
async def secured_settings(settings: Settings, secured: Secured) -> AsyncIterator[Settings]:
    """The test's settings on the secured servers, migrated, with the passwords in the URLs
    (what `password_file` makes of them); the schema is dropped afterwards."""
    result = replace(
        settings,
        postgres=replace(settings.postgres, url=secured.postgres.url(quote(PG_PASSWORD, safe=""))),
        redis=replace(settings.redis, url=secured.redis.url(quote(REDIS_PASSWORD, safe=""))),
    )
    await migrate(result.postgres)
    await register_fleet(result.postgres)
    yield result
    conn = await asyncpg.connect(result.postgres.url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{result.postgres.schema}" CASCADE')
    finally:
        await conn.close()


def file_env(secured: Secured, credentials: Path, settings: Settings) -> dict[str, str]:
    """The URLs without passwords, the passwords as credentials named by relative `…_file`s."""
    return {
        **worker_env(settings),
        "IOTFLOW_POSTGRES_URL": secured.postgres.url(),
        "IOTFLOW_REDIS_URL": secured.redis.url(),
        "IOTFLOW_POSTGRES_PASSWORD_FILE": "postgres-password",
        "IOTFLOW_REDIS_PASSWORD_FILE": "redis-password",
        "CREDENTIALS_DIRECTORY": str(credentials),
    }


def mongodb_env(server: SecuredFerretDBServer, settings: Settings) -> dict[str, str]:
    return {
        "IOTFLOW_DOCUMENTS_BACKEND": "mongodb",
        "IOTFLOW_DOCUMENTS_MONGODB_URL": server.tls_url(),
        "IOTFLOW_DOCUMENTS_MONGODB_DATABASE": settings.postgres.schema,  # the test's own
        "IOTFLOW_DOCUMENTS_MONGODB_PASSWORD_FILE": "mongodb-password",
    }


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


async def test_secured_daemon_moves_data_with_passwords_from_credentials(
    secured_settings: Settings, secured: Secured, credentials: Path
) -> None:
    port = free_port()
    env = file_env(secured, credentials, secured_settings)
    env.update(IOTFLOW_HTTP_ENABLED="true", IOTFLOW_HTTP_PORT=str(port), IOTFLOW_HTTP_HOST="127.0.0.1")
    redis = aioredis.Redis.from_url(secured_settings.redis.url, decode_responses=True)
    pg = await connect(secured_settings.postgres)
    try:
        async with iotflow_process(env, "run") as worker, aiohttp.ClientSession() as client:
            await worker.wait_for_event("supervisor.ready", timeout=TIMEOUT_S)
            await publish(secured_settings.mqtt.url, json_messages(0, 30))
            await wait_for_count(pg, ROWS, 30, timeout=TIMEOUT_S)
            latest = f"{secured_settings.redis.key_prefix}device:latest:*"
            await wait_for(lambda: _any_key(redis, latest), timeout=TIMEOUT_S)
            bodies = []
            for path in ("/readyz?verbose=1", "/metrics"):
                async with client.get(f"http://127.0.0.1:{port}{path}") as response:
                    assert response.status == 200, path
                    bodies.append(await response.text())
            assert '"ready":true' in bodies[0].replace(" ", "")
            assert await worker.terminate() == 0
        assert_no_secret(worker.output + "".join(bodies))
        ssl = "SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = 'iotflow'"
        assert await pg.fetchval(ssl) is True  # this test's own connection, over TLS too
    finally:
        await pg.close()
        await redis.aclose()


async def _any_key(client: aioredis.Redis, pattern: str) -> bool:
    return bool([key async for key in client.scan_iter(match=pattern, count=100)])


async def test_secured_jobs_and_check_use_the_tls_urls(
    secured_settings: Settings, secured: Secured, credentials: Path
) -> None:
    """arq's queue connection takes redis.url's CA and a password with characters a URL escapes."""
    env = file_env(secured, credentials, secured_settings)
    env["IOTFLOW_POSTGRES_PASSWORD_FILE"] = str(credentials / "postgres-password")  # absolute works too
    async with iotflow_process(env, "jobs", "enqueue", "sweep") as enqueue:
        assert await enqueue.wait(TIMEOUT_S) == 0, enqueue.output
    async with iotflow_process(env, "jobs", "run", "--burst", "--no-cron") as runner:
        assert await runner.wait(TIMEOUT_S) == 0, runner.output
    async with iotflow_process(env, "jobs", "status", "--job", "offline_sweep") as status:
        assert await status.wait(TIMEOUT_S) == 0, status.output
    assert "offline_sweep" in status.output
    async with iotflow_process(env, "check") as check:
        assert await check.wait(TIMEOUT_S) == 0, check.output
    assert "postgres  reachable" in check.output and "redis     reachable" in check.output
    assert_no_secret(enqueue.output + runner.output + status.output + check.output)


REFUSALS = {
    "postgres-password": ("IOTFLOW_POSTGRES_PASSWORD_FILE", "postgres at", "postgres.password_file"),
    "postgres-ca": ("IOTFLOW_POSTGRES_URL", "postgres at", "postgres.url's sslrootcert"),
    "redis-password": ("IOTFLOW_REDIS_PASSWORD_FILE", "redis at", "redis.password_file"),
    "redis-ca": ("IOTFLOW_REDIS_URL", "redis at", "redis.url's ssl_ca_certs"),
    "mongodb-password": (
        "IOTFLOW_DOCUMENTS_MONGODB_PASSWORD_FILE",
        "mongodb at",
        "documents.mongodb_password_file",
    ),
    "mongodb-ca": ("IOTFLOW_DOCUMENTS_MONGODB_URL", "mongodb at", "documents.mongodb_url's tlsCAFile"),
}


def refused_env(
    case: str, secured: Secured, credentials: Path, settings: Settings, request: pytest.FixtureRequest
) -> dict[str, str]:
    env = file_env(secured, credentials, settings)
    if case.startswith("mongodb"):
        env.update(mongodb_env(request.getfixturevalue("secured_mongodb"), settings))
    variable = REFUSALS[case][0]
    if variable.endswith("_FILE"):
        (credentials / "wrong").write_text("not-the-password\n")
        env[variable] = "wrong"
    else:
        env[variable] = env[variable].replace(
            str(secured.pki.cert_path("ca")), str(secured.stranger.cert_path("ca"))
        )
    return env


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_secured_daemon_refused_exits_2_with_one_line(
    secured_settings: Settings, secured: Secured, credentials: Path, case: str, request: pytest.FixtureRequest
) -> None:
    _, store, setting = REFUSALS[case]
    env = refused_env(case, secured, credentials, secured_settings, request)
    async with worker_process(secured_settings, **env) as worker:
        assert await worker.wait(TIMEOUT_S) == 2, worker.output
    errors = [record for record in worker.records() if record.get("level") == "error"]
    assert [e["event"] for e in errors] == ["stores.refused", "daemon.stopped"], errors
    assert store in errors[0]["error"] and setting in errors[0]["hint"], errors[0]
    assert "stores.waiting" not in worker.events()
    assert_no_secret(worker.output)


@pytest.mark.parametrize("case", ["postgres-password", "postgres-ca"])
async def test_secured_command_refused_exits_2_with_one_line(
    secured_settings: Settings, secured: Secured, credentials: Path, case: str, request: pytest.FixtureRequest
) -> None:
    _, store, setting = REFUSALS[case]
    env = refused_env(case, secured, credentials, secured_settings, request)
    async with iotflow_process(env, "migrate") as command:
        assert await command.wait(TIMEOUT_S) == 2, command.output
    lines = command.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"iotflow migrate: {store}") and setting in lines[0], lines
    assert_no_secret(command.output)


async def test_secured_mongodb_takes_indexes_and_serves_the_daemon(
    secured_settings: Settings, secured: Secured, secured_mongodb: SecuredFerretDBServer, credentials: Path
) -> None:
    port = free_port()
    env = {
        **file_env(secured, credentials, secured_settings),
        **mongodb_env(secured_mongodb, secured_settings),
    }
    async with iotflow_process(env, "migrate") as migrating:
        assert await migrating.wait(TIMEOUT_S) == 0, migrating.output
    async with iotflow_process(env, "check") as check:
        assert await check.wait(TIMEOUT_S) == 0, check.output
    assert "mongodb   reachable" in check.output and "migrated (database" in check.output
    env.update(IOTFLOW_HTTP_ENABLED="true", IOTFLOW_HTTP_PORT=str(port), IOTFLOW_HTTP_HOST="127.0.0.1")
    async with iotflow_process(env, "run") as worker, aiohttp.ClientSession() as client:
        await worker.wait_for_event("supervisor.ready", timeout=TIMEOUT_S)
        async with client.get(f"http://127.0.0.1:{port}/readyz?verbose=1") as response:
            body = await response.text()
        assert response.status == 200 and '"mongodb":true' in body.replace(" ", ""), body
        assert await worker.terminate() == 0
    assert_no_secret(migrating.output + check.output + worker.output + body)
