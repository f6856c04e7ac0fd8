"""TimescaleDB: when `iotflow migrate` uses it, where the extension goes, what the hypertable gets.

The detection runs everywhere, against a stubbed probe; the tests taking the `hypertable`
fixture need a test database with the extension preloaded (IOTFLOW_TEST_POSTGRES_URL, see
docs/operations.md) and are skipped otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import structlog

from worker.cli.daemon import _migrate
from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.stores import migrate as migrate_module
from worker.stores.migrate import MigrationRefused, TimescaleProbe, migrate, use_timescale
from worker.stores.partitions import is_partitioned
from worker.stores.postgres import connect
from worker.tools.bench.jobs import run_bench
from worker.tools.embedded import ServiceUrls

from .conftest import is_hypertable, make_settings

INSTALLED_NOT_PRELOADED = TimescaleProbe(available=True, preload="pg_stat_statements", schema=None)


@pytest.mark.parametrize(
    ("preload", "preloaded"),
    [
        ("", False),
        ("pg_stat_statements", False),
        ("timescaledb", True),
        ("pg_stat_statements, timescaledb", True),
        ('"$libdir/timescaledb"', True),
        ("timescaledb-2.28.3", True),
        ("timescaledb_toolkit", False),
    ],
)
def test_the_preload_is_read_from_shared_preload_libraries(preload: str, preloaded: bool) -> None:
    assert TimescaleProbe(available=True, preload=preload, schema=None).preloaded is preloaded


@pytest.mark.parametrize(
    ("mode", "probe", "used"),
    [
        ("auto", TimescaleProbe(available=False, preload="", schema=None), False),
        ("auto", TimescaleProbe(available=True, preload="timescaledb", schema=None), True),
        ("auto", INSTALLED_NOT_PRELOADED, False),
        # A role that may not read shared_preload_libraries: trust an extension already created.
        ("auto", TimescaleProbe(available=True, preload=None, schema=None), False),
        ("auto", TimescaleProbe(available=True, preload=None, schema="public"), True),
        ("on", TimescaleProbe(available=True, preload=None, schema=None), True),
        ("off", TimescaleProbe(available=True, preload="timescaledb", schema="public"), False),
    ],
)
def test_the_setting_and_the_probe_decide(mode: str, probe: TimescaleProbe, used: bool) -> None:
    assert use_timescale(mode, probe) is used


@pytest.mark.parametrize(
    "probe", [INSTALLED_NOT_PRELOADED, TimescaleProbe(available=False, preload="", schema=None)]
)
def test_on_refuses_what_cannot_work(probe: TimescaleProbe) -> None:
    with pytest.raises(MigrationRefused):
        use_timescale("on", probe)


async def test_a_role_that_may_not_read_the_preload_setting_still_migrates(
    service_urls: ServiceUrls, pg: asyncpg.Connection
) -> None:
    """`shared_preload_libraries` is for superusers and pg_read_all_settings only; plain
    PostgreSQL never asks, TimescaleDB is asked inside a savepoint."""
    role = f"iotflow_plain_{uuid.uuid4().hex[:8]}"
    await pg.execute(f"CREATE ROLE {role} LOGIN")
    settings = fresh_settings(service_urls, "auto")
    settings.postgres = replace(settings.postgres, url=with_user(service_urls.postgres_url, role))
    database = await pg.fetchval("SELECT current_database()")
    try:
        await pg.execute(f'GRANT CREATE ON DATABASE "{database}" TO {role}')
        await migrate(settings.postgres)
        conn = await connect(settings.postgres)
        try:
            # A hypertable where the test database has TimescaleDB (created in public by then).
            assert await is_hypertable(conn) == await is_hypertable(pg)
        finally:
            await conn.close()
    finally:
        await drop_schema(
            replace(settings, postgres=replace(settings.postgres, url=service_urls.postgres_url))
        )
        await pg.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM {role}')
        await pg.execute(f"DROP ROLE {role}")


def with_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def fresh_settings(urls: ServiceUrls, timescale: str) -> Settings:
    settings = make_settings(urls, uuid.uuid4().hex[:10])
    settings.postgres = replace(settings.postgres, timescale=timescale)  # type: ignore[arg-type]
    return settings


async def drop_schema(settings: Settings) -> None:
    conn = await connect(settings.postgres)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.postgres.schema}" CASCADE')
    finally:
        await conn.close()


async def test_auto_falls_back_to_partitions_when_installed_but_not_preloaded(
    service_urls: ServiceUrls, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def probe(conn: asyncpg.Connection) -> TimescaleProbe:
        return INSTALLED_NOT_PRELOADED

    monkeypatch.setattr(migrate_module, "probe_timescale", probe)
    settings = fresh_settings(service_urls, "auto")
    try:
        with structlog.testing.capture_logs() as logs:
            await migrate(settings.postgres)
        conn = await connect(settings.postgres)
        try:
            assert await is_partitioned(conn)
        finally:
            await conn.close()
    finally:
        await drop_schema(settings)
    warnings = [entry for entry in logs if entry["event"] == "migrate.timescaledb_unusable"]
    assert len(warnings) == 1
    assert "shared_preload_libraries" in warnings[0]["reason"]


def test_on_stops_migrate_with_exit_2_when_installed_but_not_preloaded(
    service_urls: ServiceUrls, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def probe(conn: asyncpg.Connection) -> TimescaleProbe:
        return INSTALLED_NOT_PRELOADED

    monkeypatch.setattr(migrate_module, "probe_timescale", probe)
    settings = fresh_settings(service_urls, "on")
    try:
        assert _migrate(settings, argparse.Namespace()) == ExitCode.CONFIG
    finally:
        asyncio.run(drop_schema(settings))
    err = capsys.readouterr().err
    assert "not preloaded" in err and "shared_preload_libraries" in err


async def extension_schema(conn: asyncpg.Connection) -> str:
    schema: str = await conn.fetchval(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'timescaledb'"
    )
    return schema


async def test_the_extension_lives_outside_every_application_schema(
    settings: Settings, pg: asyncpg.Connection, service_urls: ServiceUrls, hypertable: None
) -> None:
    assert await extension_schema(pg) not in (settings.postgres.schema, "")
    # A second application schema in the same database migrates to a hypertable too …
    second = fresh_settings(service_urls, "on")
    try:
        await migrate(second.postgres)
        conn = await connect(second.postgres)
        try:
            assert await is_hypertable(conn)
        finally:
            await conn.close()
    finally:
        await drop_schema(second)
    # … and dropping it leaves the extension, and this schema's hypertable, alone.
    assert await extension_schema(pg)
    assert await is_hypertable(pg)
    await pg.execute("INSERT INTO decoded_data VALUES ('2026-06-01 08:00+00', 1, 1, 1.0)")


async def test_the_hypertable_has_no_index_duplicating_its_primary_key(
    pg: asyncpg.Connection, hypertable: None
) -> None:
    indexes = {
        row["indexname"]
        for row in await pg.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'decoded_data'"
        )
    }
    assert indexes == {"decoded_data_pkey", "decoded_data_device_time"}


async def test_the_jobs_bench_runs_on_either_backend_and_drops_its_schema(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    schema = f"{settings.postgres.schema}_bench"
    result = await run_bench(
        settings,
        readings=1_000,
        series=10,
        hours=1,
        schema=schema,
        target_rate=10_000.0,
        connections=2,
        keep=False,
        progress=lambda message: None,
    )
    assert result.hourly_rows == 10
    assert await pg.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema) == 0
