"""PostgreSQL connections, with the configured schema on the search path.

The one place that connects to PostgreSQL: `create_pool` for the `Stores` owner,
`connect` for a single connection (migrations, a schema check, tools). A server that
does not answer raises `Unreachable`, naming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from worker.config import PostgresSettings, redact_url
from worker.retry import CertificateRefused, Unreachable, describe, is_certificate_refusal, is_transient

# A connection of its own or one borrowed from a pool: the callers here take either.
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy

CONNECT_TIMEOUT_S = 10.0


def server_settings(
    settings: PostgresSettings, application_name: str = "iotflow", lock_timeout_s: float | None = None
) -> dict[str, str]:
    # `public` last: extensions such as TimescaleDB install their functions there.
    values = {"search_path": f'"{settings.schema}", public', "application_name": application_name}
    if lock_timeout_s is not None:
        values["lock_timeout"] = f"{int(lock_timeout_s * 1000)}ms"
    return values


@contextlib.contextmanager
def _naming_the_server(settings: PostgresSettings) -> Iterator[None]:
    """A failed connect says which server: asyncpg raises a bare ConnectionRefusedError."""
    try:
        yield
    except Exception as exc:
        if is_certificate_refusal(exc):  # asyncpg's is the ssl module's, which names no server
            raise CertificateRefused("asyncpg", describe(exc)) from exc
        if not is_transient(exc):
            raise  # a refusal (password, database) or a bug: as it is
        raise Unreachable("postgres", redact_url(settings.url), describe(exc)) from exc


async def connect(settings: PostgresSettings, timeout: float = CONNECT_TIMEOUT_S) -> asyncpg.Connection:
    with _naming_the_server(settings):
        return await asyncpg.connect(settings.url, server_settings=server_settings(settings), timeout=timeout)


async def create_pool(
    settings: PostgresSettings,
    *,
    max_size: int,
    application_name: str = "iotflow",
    lock_timeout_s: float | None = None,
    command_timeout_s: float | None = None,
) -> asyncpg.Pool:
    """`command_timeout_s` (default `settings.command_timeout_s`) bounds every statement, so a
    hung server or connection surfaces as a TimeoutError the callers retry, not as silence."""
    with _naming_the_server(settings):
        pool = await asyncpg.create_pool(
            settings.url,
            min_size=1,
            max_size=max_size,
            server_settings=server_settings(settings, application_name, lock_timeout_s),
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=command_timeout_s or settings.command_timeout_s,
        )
    assert pool is not None  # create_pool only returns None when not awaited
    return pool
