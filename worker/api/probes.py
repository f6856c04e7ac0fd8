"""/healthz (alive), /readyz (ingest flows and acknowledges) and /metrics (Prometheus text)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from worker.metrics import Metrics

JSON = "application/json"


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


def probe_routes(metrics: Metrics, readiness: Callable[[], Awaitable[Readiness]]) -> list[web.RouteDef]:
    """GET (and HEAD) only; a query string is ignored, as a probe's path is what it asks for."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"alive"}', content_type=JSON)

    async def readyz(request: web.Request) -> web.Response:
        state = await readiness()
        body = orjson.dumps({"ready": state.ready, "degraded": state.degraded, "checks": state.checks})
        return web.Response(body=body, status=200 if state.ready else 503, content_type=JSON)

    async def prometheus(request: web.Request) -> web.Response:
        # CONTENT_TYPE_LATEST carries its own charset parameter, which content_type= refuses.
        return web.Response(body=metrics.render_prometheus(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", prometheus)]
