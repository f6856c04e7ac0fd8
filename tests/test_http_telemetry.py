"""`POST /api/v1/telemetry` on a real daemon: a 200 only once the readings are in
PostgreSQL (they are there when the answer comes), a retry stores nothing twice, a bad body
gets the dead letter's reason and the dead letter is stored before the answer, concurrent
requests all land, a device over its rate limit gets 429 with Retry-After, and only a
device's own key may post."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest

from worker.config import Settings
from worker.decode.parse import MessageParser, ParsedMessage
from worker.tools.embedded import free_port

from .helpers import running_daemon, wait_for, worker_process
from .http_api import ADMIN, TOKEN, Api, register
from .test_outages import proxied


async def _api(settings: Settings) -> AsyncIterator[Api]:
    settings.http = replace(settings.http, enabled=True, port=0, api=True, admin_tokens=[TOKEN])
    async with running_daemon(settings) as daemon, aiohttp.ClientSession() as client:
        assert daemon.http is not None
        base = f"http://127.0.0.1:{daemon.http.port}/api/v1"
        body = {
            "device_key": "poster-1",
            "datapoints": [{"label": "temperature"}, {"label": "humidity", "min": 0, "max": 100}],
        }
        device = await register(client, base, body)
        yield Api(base, client, device["device_id"], device["api_key"])


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async for value in _api(settings):
        yield value


def _timed(n: int) -> dict[str, Any]:
    return {
        "ts": int(time.time() * 1000) - 60_000 + n,
        "values": {"temperature": 20 + n / 10, "humidity": 50},
    }


async def _readings(pg: asyncpg.Connection, device_id: int) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM decoded_data WHERE device_id = $1", device_id))


async def test_a_200_means_the_readings_are_stored_and_a_retry_stores_nothing_twice(
    api: Api, pg: asyncpg.Connection
) -> None:
    first = _timed(0)
    status, _, body = await api.post(first)
    assert (status, body) == (200, {"accepted": 2})
    assert await _readings(pg, api.device_id) == 2  # no waiting: stored before the answer
    status, _, body = await api.post([_timed(1), _timed(2), {"temperature": 19.5}])
    assert (status, body) == (200, {"accepted": 5})
    assert await _readings(pg, api.device_id) == 7
    status, _, _ = await api.post(first)  # a client that got no answer sends it again
    assert status == 200
    assert await _readings(pg, api.device_id) == 7


async def test_a_body_is_parsed_once(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer's count comes from the decoder's parse, not from parsing the body again."""
    parses: list[str] = []
    parse = MessageParser.parse

    def counted(self: MessageParser, topic: str, payload: bytes, received_at: float) -> ParsedMessage:
        parses.append(topic)
        return parse(self, topic, payload, received_at)

    monkeypatch.setattr(MessageParser, "parse", counted)
    status, _, body = await api.post([_timed(0), _timed(1)])
    assert (status, body) == (200, {"accepted": 4})
    assert parses == ["devices/poster-1/telemetry"]


async def test_twenty_concurrent_requests_all_land(api: Api, pg: asyncpg.Connection) -> None:
    results = await asyncio.gather(*(api.post([_timed(10 * n), _timed(10 * n + 1)]) for n in range(20)))
    assert [(status, body) for status, _, body in results] == [(200, {"accepted": 4})] * 20
    assert await _readings(pg, api.device_id) == 80


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        (b"{not json", 400, "bad_json"),
        ({"pressure": 1013}, 422, "unknown_datapoint"),
        ({"humidity": 150}, 422, "out_of_range"),
        ({"ts": "yesterday", "values": {"temperature": 1}}, 422, "bad_timestamp"),
        ({"note": "hello"}, 422, "no_numeric_values"),
        ([], 422, "bad_payload"),
    ],
)
async def test_a_bad_body_gets_the_dead_letter_reason_and_the_dead_letter_is_stored(
    api: Api, pg: asyncpg.Connection, payload: Any, status: int, reason: str
) -> None:
    got, _, body = await api.post(payload)
    assert (got, body["error"]) == (status, reason), body
    stored = await pg.fetchval("SELECT reason FROM dead_letters WHERE topic = 'devices/poster-1/telemetry'")
    assert stored is not None and stored.startswith(f"{reason}:")
    assert await _readings(pg, api.device_id) == 0


async def test_only_the_devices_own_key_may_post(api: Api, pg: asyncpg.Connection) -> None:
    for headers, expected in (({}, 401), ({"X-API-Key": "nope"}, 401), (ADMIN, 403)):
        status, _, body = await api.post(_timed(0), headers)
        assert status == expected and body["error"] in {"unauthorized", "forbidden"}
    assert await _readings(pg, api.device_id) == 0


async def test_over_the_rate_limit_is_429_with_retry_after(settings: Settings) -> None:
    settings.pipeline = replace(settings.pipeline, rate_limit_messages=2, rate_limit_window_s=60)
    async for api in _api(settings):
        answers = [await api.post(_timed(n)) for n in range(3)]
        assert [status for status, _, _ in answers] == [200, 200, 429]
        _, headers, body = answers[2]
        assert body["error"] == "rate_limited" and headers["Retry-After"] == "60"


async def test_kill_9_while_twenty_clients_post_loses_no_reading_answered_200(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    port = free_port()
    env = {
        "IOTFLOW_HTTP_ENABLED": "true",
        "IOTFLOW_HTTP_HOST": "127.0.0.1",
        "IOTFLOW_HTTP_PORT": str(port),
        "IOTFLOW_HTTP_API": "true",
        "IOTFLOW_HTTP_ADMIN_TOKENS": TOKEN,
    }
    base = f"http://127.0.0.1:{port}/api/v1"
    answered: list[datetime] = []
    start = int(time.time() * 1000) - 3_600_000
    async with worker_process(settings, **env) as worker, aiohttp.ClientSession() as client:
        await worker.wait_for_event("supervisor.ready")
        device = await register(
            client, base, {"device_key": "killed-1", "datapoints": [{"label": "temperature"}]}
        )
        headers = {"X-API-Key": device["api_key"]}

        async def post_until_it_dies(n: int) -> None:
            for i in range(100_000):
                ts = start + n * 100_000 + i
                reading = {"ts": ts, "values": {"temperature": float(i)}}
                try:
                    async with client.post(f"{base}/telemetry", json=reading, headers=headers) as response:
                        if response.status == 200:
                            answered.append(datetime.fromtimestamp(ts / 1000, UTC))
                except aiohttp.ClientError:
                    return

        clients = [asyncio.create_task(post_until_it_dies(n)) for n in range(20)]
        try:

            async def enough() -> bool:
                return len(answered) >= 300

            await wait_for(enough, timeout=60)
            await worker.kill()
            await asyncio.wait_for(asyncio.gather(*clients), 60)
        finally:
            for task in clients:
                task.cancel()
    rows = await pg.fetch("SELECT timestamp FROM decoded_data WHERE device_id = $1", device["device_id"])
    stored = [row["timestamp"] for row in rows]
    assert len(stored) == len(set(stored))
    assert set(answered) <= set(stored), f"{len(set(answered) - set(stored))} answered 200 and lost"


async def test_with_redis_away_keys_are_checked_and_telemetry_is_stored(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    proxy, url = await proxied(settings.redis.url)
    settings.redis = replace(settings.redis, url=url)
    settings.storage = replace(settings.storage, write_timeout_s=2.0)
    try:
        async for api in _api(settings):
            assert (await api.post(_timed(0)))[0] == 200  # the key is cached in Redis now
            proxy.cut()
            status, _, body = await api.post([_timed(1), _timed(2)])
            assert (status, body) == (200, {"accepted": 4})
            assert await _readings(pg, api.device_id) == 6
            status, _, body = await api.post(_timed(3), {"X-API-Key": api.key + "x"})
            assert (status, body["error"]) == (401, "unauthorized")
            async with api.client.get(
                f"{api.base}/devices/poster-1/status", headers={"X-API-Key": api.key}
            ) as got:
                assert got.status == 200
                assert (await got.json())["latest"] == {"temperature": 20.2, "humidity": 50.0}
            await proxy.restore()
    finally:
        await proxy.stop()


async def test_with_postgres_away_no_request_is_answered_200_until_it_is_stored(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    proxy, url = await proxied(settings.postgres.url)
    settings.postgres = replace(settings.postgres, url=url)
    try:
        async for api in _api(settings):
            assert (await api.post(_timed(0)))[0] == 200  # the key and the device are cached now
            proxy.cut()
            waiting = [asyncio.create_task(api.post(_timed(n))) for n in range(1, 6)]
            try:
                done, _ = await asyncio.wait(waiting, timeout=3)
                for task in done:  # none stored, so none may say 200
                    assert task.result()[0] == 503, task.result()
                assert await _readings(pg, api.device_id) == 2
                await proxy.restore()
                answers = await asyncio.wait_for(asyncio.gather(*waiting), 60)
            finally:
                for task in waiting:
                    task.cancel()
            stored = await _readings(pg, api.device_id)
            # Every 200 is stored; a 503 may be too (stored, then the pipeline restarted before its ack).
            assert 2 + 2 * sum(1 for status, _, _ in answers if status == 200) <= stored <= 12
            assert all(status in (200, 503) for status, _, _ in answers)
    finally:
        await proxy.stop()
