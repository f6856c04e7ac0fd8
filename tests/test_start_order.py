"""A worker started while PostgreSQL is down waits for it: not ready meanwhile, nothing lost."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg

from worker.config import Settings
from worker.pipeline import Daemon

from .helpers import background, publish, running_daemon, wait_for_count
from .test_outages import json_messages, proxied


async def test_a_worker_started_with_postgres_down_waits_then_loses_nothing(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    proxy, url = await proxied(settings.postgres.url)
    settings.postgres = replace(settings.postgres, url=url)
    try:
        # A first run leaves the broker a persistent session to queue into, as in production.
        async with running_daemon(settings):
            await publish(settings.mqtt.url, json_messages(0, 10))
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 10)

        proxy.cut()
        daemon = Daemon(settings)
        async with background(daemon.run(handle_signals=False)) as run:
            await publish(settings.mqtt.url, json_messages(10, 200))  # the broker holds them
            readiness = await daemon._readiness()
            assert not daemon.ready.is_set() and not readiness.ready, readiness
            assert not run.done()  # waiting, not given up

            await proxy.restore()
            await asyncio.wait_for(daemon.ready.wait(), 60)
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 210, timeout=60)
            daemon.request_stop()
            assert await asyncio.wait_for(run, 30) == 0
        assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 210
    finally:
        await proxy.stop()
