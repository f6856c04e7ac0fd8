"""The device API under /api/v1 (`http.api = true`): its routes, its error form and who may
call each route. The stores are the daemon's; until they are open, every route answers 503."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import orjson
from aiohttp import web

from worker.api.auth import caller, require_admin
from worker.api.certs import issue_device_certificate
from worker.api.configs import get_config, put_config
from worker.api.devices import json_object, register_handler
from worker.api.errors import RETRY_AFTER_S, ApiError, Handler, json_errors, json_response
from worker.api.keys import DeviceKeys
from worker.api.openapi import DOCUMENT
from worker.api.reads import device_status, find, history
from worker.api.telemetry import TelemetryRoute
from worker.config import Settings
from worker.intake.http import HttpIntake
from worker.stores import Stores

PREFIX = "/api/v1"


def api_app(
    settings: Settings, stores: Callable[[], Stores | None], intake: Callable[[], HttpIntake | None]
) -> web.Application:
    """`stores` and `intake`: the daemon's, None while it starts (or restarts its pipeline)."""
    http = settings.http
    app = web.Application(middlewares=[json_errors])
    telemetry = TelemetryRoute(intake, settings.pipeline.rate_limit_window_s)

    def opened() -> Stores:
        current = stores()
        if current is None:
            retry = {"Retry-After": str(RETRY_AFTER_S)}
            raise ApiError(503, "starting", "the worker is connecting to its stores", retry)
        return current

    def admin(route: Callable[[Stores], Handler]) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            require_admin(request, http.admin_tokens)
            return await route(opened())(request)

        return handle

    async def device(request: web.Request) -> tuple[Stores, asyncpg.Record]:
        """The stores and the device `{id}` names, once the caller may read it: an admin,
        or the device itself (a device asking for any other, known or not, is refused)."""
        current = opened()
        owner = await caller(
            request, http.admin_tokens, DeviceKeys(current.postgres, current.redis, current.keys)
        )
        try:
            row = await find(current, request.match_info["id"])
        except ApiError:
            if owner is None:
                raise
            row = None
        if owner is not None and (row is None or row["id"] != owner.device_id):
            raise ApiError(403, "forbidden", "a device key reads only its own device")
        assert row is not None
        return current, row

    async def status(request: web.Request) -> web.StreamResponse:
        current, row = await device(request)
        return json_response(await device_status(current, row))

    async def readings(request: web.Request) -> web.StreamResponse:
        current, row = await device(request)
        return json_response(await history(current, int(row["id"]), request))

    async def post_telemetry(request: web.Request) -> web.StreamResponse:
        current = opened()
        keys = DeviceKeys(current.postgres, current.redis, current.keys)
        owner = await caller(request, http.admin_tokens, keys)
        if owner is None:
            raise ApiError(403, "forbidden", "telemetry is posted with the device's own key (X-API-Key)")
        return await telemetry.post(request, owner.device_key)

    async def read_config(request: web.Request) -> web.StreamResponse:
        current, row = await device(request)
        return await get_config(current, row)

    async def write_config(request: web.Request) -> web.StreamResponse:
        require_admin(request, http.admin_tokens)
        current = opened()
        row = await find(current, request.match_info["id"])
        return await put_config(current, row, request, await json_object(request))

    def certificate(current: Stores) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await issue_device_certificate(current, http.ca_dir, request)

        return handle

    document = orjson.dumps(DOCUMENT)

    async def openapi(request: web.Request) -> web.StreamResponse:
        return web.Response(body=document, content_type="application/json")

    app.router.add_get("/openapi.json", openapi)
    app.router.add_post("/devices/register", admin(register_handler))
    app.router.add_post("/telemetry", post_telemetry)
    app.router.add_get("/devices/{id}/status", status)
    app.router.add_get("/telemetry/{id}", readings)
    app.router.add_get("/devices/{id}/config", read_config)
    app.router.add_put("/devices/{id}/config", write_config)
    app.router.add_post("/certs/devices/{mac}", admin(certificate))
    return app
