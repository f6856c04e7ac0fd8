"""/healthz, /readyz and /metrics on the daemon's HTTP server (aiohttp, worker/api): a probe
with a query string is still that probe, other methods are refused, a connection is kept
alive across requests, and a stopped daemon has closed its port."""

from __future__ import annotations

import socket
from dataclasses import replace

import aiohttp
import pytest

from worker.config import Settings

from .helpers import running_daemon


async def test_probes_answer_with_a_query_string_on_one_kept_alive_connection(settings: Settings) -> None:
    settings.http = replace(settings.http, enabled=True, port=0)
    connections = 0

    async def count(*_: object) -> None:
        nonlocal connections
        connections += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(count)
    async with running_daemon(settings) as daemon, aiohttp.ClientSession(trace_configs=[trace]) as client:
        assert daemon.http is not None
        base = f"http://127.0.0.1:{daemon.http.port}"
        async with client.get(f"{base}/healthz?from=probe") as response:
            assert response.status == 200 and await response.json() == {"status": "alive"}
        async with client.get(f"{base}/readyz?verbose=1") as response:
            body = await response.json()
            assert response.status == 200 and body["ready"] is True and body["degraded"] == []
        async with client.get(f"{base}/metrics?name[]=x") as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            assert "iotflow_messages_received_total" in await response.text()
    assert connections == 1, "a connection was closed after an answer, not kept alive"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_probes_refuse_other_methods_with_405(settings: Settings, method: str) -> None:
    settings.http = replace(settings.http, enabled=True, port=0)
    async with running_daemon(settings) as daemon, aiohttp.ClientSession() as client:
        assert daemon.http is not None
        for path in ("/healthz", "/readyz", "/metrics"):
            async with client.request(method, f"http://127.0.0.1:{daemon.http.port}{path}") as response:
                assert response.status == 405, path
                assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}
        async with client.get(f"http://127.0.0.1:{daemon.http.port}/nowhere") as response:
            assert response.status == 404


async def test_a_stopped_daemon_has_closed_its_port(settings: Settings) -> None:
    settings.http = replace(settings.http, enabled=True, port=0)
    async with running_daemon(settings) as daemon:
        assert daemon.http is not None
        port = daemon.http.port
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
