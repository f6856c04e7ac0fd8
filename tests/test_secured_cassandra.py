"""Cassandra with a login (PasswordAuthenticator) and client encryption, certificates from
`iotflow certs`: `migrate`, the writer, the reads (`iotflow query`) and `check` connect with
the same settings; a wrong password or an untrusted CA is exit 2 and one line naming the
setting; the password is in no log line, metric or /readyz body."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import cassandra_worker_env
from worker.config import CassandraSettings, ConfigError, Settings, load_settings
from worker.ops.certs import CertStore
from worker.stores.cassandra import CassandraStore
from worker.tools.embedded import free_port
from worker.tools.servers import CassandraServer

from .helpers import iotflow_process, publish, wait_for, wait_ready, with_cassandra, worker_process
from .test_outages import json_messages

TIMEOUT_S = 90  # generous: the verdict is the exit code or the rows, not how fast they came
USER = "iotflow"
PASSWORD = f"cass-{uuid.uuid4().hex}"  # this session's own, to be looked for in every output


async def _login_works(settings: CassandraSettings) -> bool:
    store = CassandraStore(settings)
    try:
        return await store.ping()
    except Exception:  # the default superuser is made a moment after the port opens
        return False
    finally:
        await store.close()


@pytest.fixture(scope="module")
def secured_cassandra(secured_cassandra_server: CassandraServer, store_certs: CertStore) -> CassandraSettings:
    """Settings of a login of USER over TLS on the secured node (the role made here, by the
    default superuser)."""

    async def make_role() -> None:
        superuser = CassandraSettings(
            port=secured_cassandra_server.port, username="cassandra", password="cassandra", consistency="one"
        )
        await wait_for(lambda: _login_works(superuser), timeout=TIMEOUT_S, interval=0.5)
        store = CassandraStore(superuser)
        try:
            await store.execute(
                f"CREATE ROLE IF NOT EXISTS {USER} WITH PASSWORD = '{PASSWORD}' AND LOGIN = true AND SUPERUSER = true"
            )
        finally:
            await store.close()

    asyncio.run(make_role())
    return CassandraSettings(
        port=secured_cassandra_server.port,
        consistency="one",
        username=USER,
        password=PASSWORD,
        tls=True,
        ca_file=str(store_certs.cert_path("ca")),
    )


def configured(settings: Settings, secured: CassandraSettings) -> Settings:
    """`settings` with the readings in a keyspace of the test's own on the secured node."""
    settings = with_cassandra(settings, f"127.0.0.1:{secured.port}", "cassandra")
    settings.cassandra = replace(
        secured, keyspace=settings.cassandra.keyspace, local_dc=settings.cassandra.local_dc
    )
    return settings


def cassandra_env(settings: Settings, password_file: Path | None = None) -> dict[str, str]:
    c = settings.cassandra
    env = {
        **cassandra_worker_env(settings),
        "IOTFLOW_CASSANDRA_USERNAME": c.username,
        "IOTFLOW_CASSANDRA_TLS": "true" if c.tls else "false",
        "IOTFLOW_CASSANDRA_CA_FILE": c.ca_file,
    }
    if password_file is not None:
        password_file.write_text(c.password + "\n")
        env["IOTFLOW_CASSANDRA_PASSWORD_FILE"] = str(password_file)
    else:
        env["IOTFLOW_CASSANDRA_PASSWORD"] = c.password
    return env


@contextlib.asynccontextmanager
async def dropped_afterwards(settings: Settings) -> AsyncIterator[CassandraStore]:
    store = CassandraStore(settings.cassandra)
    try:
        yield store
    finally:
        with contextlib.suppress(Exception):
            await store.execute(f"DROP KEYSPACE IF EXISTS {settings.cassandra.keyspace}")
        await store.close()


async def run(env: dict[str, str], *argv: str) -> tuple[int, str]:
    async with iotflow_process(env, *argv) as process:
        code = await process.wait(timeout=120)
        return code, process.output


async def test_secured_cassandra_migrate_writer_reads_and_check_over_tls_with_a_login(
    settings: Settings,
    pg: asyncpg.Connection,
    secured_cassandra: CassandraSettings,
    tmp_path: Path,
) -> None:
    """`migrate`, the daemon's writer, `iotflow query` and `check`, the password from
    `password_file`: the readings land and are read back; neither the outputs, /metrics
    nor /readyz hold the password."""
    settings = configured(settings, secured_cassandra)
    env = cassandra_env(settings, tmp_path / "cassandra-password")
    port = free_port()
    outputs: list[str] = []
    readyz: list[str] = []
    async with dropped_afterwards(settings) as store:
        code, output = await run(env, "migrate")
        outputs.append(output)
        assert code == 0, output[-3000:]
        daemon_env = {
            **env,
            "IOTFLOW_HTTP_ENABLED": "true",
            "IOTFLOW_HTTP_HOST": "127.0.0.1",
            "IOTFLOW_HTTP_PORT": str(port),
            "IOTFLOW_LOG_LEVEL": "debug",
        }
        async with iotflow_process(daemon_env, "run") as worker, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}"
            await wait_ready(http, base, readyz, TIMEOUT_S)
            await publish(settings.mqtt.url, json_messages(0, 30))
            device_id = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'sim-json-01'")

            async def landed() -> bool:
                result = await store.execute(
                    f"SELECT count(*) FROM {settings.cassandra.keyspace}.device_data WHERE device_id = %s",
                    [device_id],
                )
                return bool(result.current_rows[0][0] == 30)

            await wait_for(landed, timeout=TIMEOUT_S, interval=0.2)
            async with http.get(f"{base}/metrics") as response:
                outputs.append(await response.text())
            assert await worker.terminate() == 0
            outputs.append(worker.output)
        now = datetime.now(UTC)
        span = [
            "--from",
            (now - timedelta(days=1)).isoformat(),
            "--to",
            (now + timedelta(minutes=1)).isoformat(),
        ]
        code, output = await run(env, "query", "device", "sim-json-01", *span)
        outputs.append(output)
        assert code == 0, output[-3000:]
        assert "store=cassandra rows=30" in output, output[-3000:]
        code, output = await run(env, "check")
        outputs.append(output)
        assert code == 0, output
        (line,) = [line for line in output.splitlines() if line.startswith("cassandra ")]
        assert "reachable" in line and "migrated (keyspace" in line, line
    assert '"cassandra":true' in readyz[-1].replace(" ", ""), readyz[-1]
    for text in [*outputs, *readyz]:
        assert PASSWORD not in text


def _untrusted_ca(directory: Path) -> str:
    other = CertStore(directory / "other-ca")
    other.init(common_name="Not the Cassandra CA")
    return str(other.cert_path("ca"))


@pytest.mark.parametrize(
    ("case", "setting"), [("wrong-password", "cassandra.password"), ("untrusted-ca", "cassandra.ca_file")]
)
async def test_secured_cassandra_refusals_exit_2_with_one_line_naming_the_setting(
    settings: Settings, secured_cassandra: CassandraSettings, tmp_path: Path, case: str, setting: str
) -> None:
    settings = configured(settings, secured_cassandra)
    wrong = f"wrong-{uuid.uuid4().hex}"
    env = cassandra_env(settings)
    if case == "wrong-password":
        env["IOTFLOW_CASSANDRA_PASSWORD"] = wrong
    else:
        env["IOTFLOW_CASSANDRA_CA_FILE"] = _untrusted_ca(tmp_path)
    async with worker_process(settings, **env) as worker:
        code = await worker.wait(TIMEOUT_S)
        lines = worker.records()
        output = worker.output
    assert code == 2, output[-3000:]
    errors = [line for line in lines if line.get("level") == "error"]
    assert [e["event"] for e in errors] == ["stores.refused", "daemon.stopped"], errors
    assert str(errors[0]["error"]).startswith(f"{setting}: "), errors[0]
    assert not any(line.get("event") == "stores.waiting" for line in lines)
    assert PASSWORD not in output and wrong not in output
    # `migrate` meets the same refusal (after PostgreSQL's migrations): one line, exit 2.
    code, output = await run(env, "migrate")
    assert code == 2, output[-3000:]
    *before, line = output.strip().splitlines()
    assert line.startswith(f"iotflow migrate: {setting}: "), line
    assert not any('"level":"error"' in earlier or "Traceback" in earlier for earlier in before), before


# --- the settings, checked when loaded --------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "setting"),
    [
        ({"IOTFLOW_CASSANDRA_USERNAME": "iotflow"}, "cassandra.username"),
        ({"IOTFLOW_CASSANDRA_PASSWORD": "x"}, "cassandra.username"),
        ({"IOTFLOW_CASSANDRA_CA_FILE": "/etc/hostname"}, "cassandra.tls"),
        (
            {"IOTFLOW_CASSANDRA_TLS": "true", "IOTFLOW_CASSANDRA_CERT_FILE": "/etc/hostname"},
            "cassandra.cert_file",
        ),
        (
            {"IOTFLOW_CASSANDRA_TLS": "true", "IOTFLOW_CASSANDRA_CA_FILE": "/nonexistent/ca.pem"},
            "cassandra.ca_file",
        ),
        ({"IOTFLOW_CASSANDRA_TLS": "maybe"}, "cassandra.tls"),
        (
            {"IOTFLOW_CASSANDRA_USERNAME": "iotflow", "IOTFLOW_CASSANDRA_PASSWORD_FILE": "/nonexistent/pw"},
            "cassandra.password_file",
        ),
    ],
)
def test_secured_cassandra_settings_refuse_what_cannot_work(environ: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ=environ)
    assert raised.value.setting.startswith(setting), raised.value
    assert "\n" not in str(raised.value)


def test_secured_cassandra_password_file_is_read_once_its_newline_stripped(tmp_path: Path) -> None:
    path = tmp_path / "cassandra-password"
    path.write_text("s3cret\n")
    settings = load_settings(
        environ={"IOTFLOW_CASSANDRA_USERNAME": "iotflow", "IOTFLOW_CASSANDRA_PASSWORD_FILE": str(path)}
    )
    assert settings.cassandra.password == "s3cret"
    assert "s3cret" not in repr(settings.cassandra)
