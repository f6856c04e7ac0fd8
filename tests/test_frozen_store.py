"""A store that hangs instead of failing (SIGSTOP, a dead link): it is reported, timed out,
dropped and retried, and nothing is lost or acknowledged early."""

from __future__ import annotations

from dataclasses import replace

import asyncpg

from worker.config import Settings

from .helpers import publish, running_daemon, wait_for, wait_for_count
from .test_outages import json_messages, proxied


async def _true(value: bool) -> bool:
    return value


async def test_a_frozen_postgres_is_reported_timed_out_and_recovered_from(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    proxy, url = await proxied(settings.postgres.url)
    settings.postgres = replace(settings.postgres, url=url, command_timeout_s=3.0)
    settings.pipeline = replace(settings.pipeline, slow_write_s=0.5)
    try:
        async with running_daemon(settings) as daemon:
            await publish(settings.mqtt.url, json_messages(0, 100))
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 100)
            counters = daemon.metrics.counters
            assert daemon.metrics.count("sink_slow", sink="postgres") == 0

            proxy.freeze()  # connections stay open, nothing answers
            await publish(settings.mqtt.url, json_messages(100, 300))
            await wait_for(lambda: _true(daemon.metrics.count("sink_slow", sink="postgres") >= 1), timeout=30)
            assert counters["messages_committed"] == 100  # held, not acknowledged
            # The command timeout turns the silence into an error the writer retries.
            await wait_for(
                lambda: _true(daemon.metrics.count("sink_errors", sink="postgres") >= 1), timeout=30
            )
            assert counters["messages_committed"] == 100

            proxy.thaw()
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 400, timeout=60)
            await wait_for(lambda: _true(counters["messages_committed"] == 400), timeout=30)
        assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 400
    finally:
        proxy.thaw()
        await proxy.stop()
