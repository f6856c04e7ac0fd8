"""The device API under /api/v1 (`http.api = true`): its routes, its error form and who may
call each route. The stores are the daemon's; until they are open, every route answers 503."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from worker.api.auth import require_admin
from worker.api.devices import register_handler
from worker.api.errors import RETRY_AFTER_S, ApiError, Handler, json_errors
from worker.config import HttpSettings
from worker.stores import Stores

PREFIX = "/api/v1"


def api_app(settings: HttpSettings, stores: Callable[[], Stores | None]) -> web.Application:
    app = web.Application(middlewares=[json_errors])

    def opened() -> Stores:
        current = stores()
        if current is None:
            retry = {"Retry-After": str(RETRY_AFTER_S)}
            raise ApiError(503, "starting", "the worker is connecting to its stores", retry)
        return current

    def admin(route: Callable[[Stores], Handler]) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            require_admin(request, settings.admin_tokens)
            return await route(opened())(request)

        return handle

    app.router.add_post("/devices/register", admin(register_handler))
    return app
