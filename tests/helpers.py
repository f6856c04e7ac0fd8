"""Shared test helpers: run the daemon in-process, publish, wait for rows."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlparse

import aiomqtt
import asyncpg

from worker.config import Settings
from worker.pipeline import Daemon


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Daemon]:
    """The daemon in this event loop; stopped gracefully on exit (its exit code is checked)."""
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run(handle_signals=False))
    ready = asyncio.create_task(daemon.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if task in done:
            raise AssertionError(f"daemon exited early with {task.result()}")
        task.cancel()
        raise AssertionError("daemon not ready within 20 s")
    try:
        yield daemon
    finally:
        daemon.request_stop()
        code = await asyncio.wait_for(task, 30)
        assert code == 0, f"daemon exited with {code}"


async def publish(url: str, messages: list[tuple[str, bytes]], qos: int = 1) -> None:
    parsed = urlparse(url)
    async with aiomqtt.Client(parsed.hostname or "127.0.0.1", parsed.port or 1883) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=qos)


async def wait_for(
    probe: Callable[[], Awaitable[bool]], timeout: float = 20.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def wait_for_count(conn: asyncpg.Connection, query: str, expected: int, timeout: float = 20.0) -> int:
    last = -1

    async def probe() -> bool:
        nonlocal last
        last = await conn.fetchval(query)
        return bool(last >= expected)

    try:
        await wait_for(probe, timeout)
    except AssertionError:
        raise AssertionError(f"{query!r} reached {last}, expected {expected}") from None
    return last
