"""A tiny HTTP server for probes: /healthz (alive), /readyz (ingest flows and acknowledges), /metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from worker.config import HttpSettings
from worker.metrics import Metrics

log = structlog.get_logger("worker.http")


@dataclass(frozen=True, slots=True)
class Readiness:
    """What /readyz says. Ready means durable ingest flows and is acknowledged: a check in
    `tolerated` may fail (a derivable store, or one whose batches an outbox keeps) and the
    worker is still ready, only degraded, so an orchestrator neither stops a rollout nor
    takes a working worker out of service for it."""

    checks: dict[str, bool]
    tolerated: frozenset[str] = frozenset()

    @property
    def degraded(self) -> list[str]:
        return sorted(name for name in self.tolerated if self.checks.get(name) is False)

    @property
    def ready(self) -> bool:
        return all(ok for name, ok in self.checks.items() if name not in self.tolerated)


class HealthServer:
    def __init__(
        self,
        settings: HttpSettings,
        metrics: Metrics,
        readiness: Callable[[], Awaitable[Readiness]],
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._readiness = readiness
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._settings.host, self._settings.port)
        port = self._server.sockets[0].getsockname()[1]
        log.info("http.listening", host=self._settings.host, port=port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else "/"
            status, content_type, body = await self._route(path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/healthz":
            return "200 OK", "application/json", b'{"status":"alive"}'
        if path == "/readyz":
            readiness = await self._readiness()
            ok = readiness.ready
            body = orjson.dumps({"ready": ok, "degraded": readiness.degraded, "checks": readiness.checks})
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self._metrics.render_prometheus()
        return "404 Not Found", "text/plain", b"not found\n"
