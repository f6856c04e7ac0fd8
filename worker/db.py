"""PostgreSQL connections with the configured schema on the search path."""

from __future__ import annotations

import asyncpg

from worker.config import PostgresSettings


def _server_settings(settings: PostgresSettings) -> dict[str, str]:
    return {"search_path": f'"{settings.schema}", public', "application_name": "iotflow"}


async def connect(settings: PostgresSettings, timeout: float = 10.0) -> asyncpg.Connection:
    return await asyncpg.connect(settings.url, server_settings=_server_settings(settings), timeout=timeout)


async def create_pool(settings: PostgresSettings, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        settings.url,
        min_size=min_size,
        max_size=max_size,
        server_settings=_server_settings(settings),
        timeout=10.0,
    )
    assert pool is not None  # create_pool only returns None when not awaited
    return pool
