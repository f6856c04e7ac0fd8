"""The API's one error form, `{"error": "<reason>", "detail": "<one line>"}`, for every
answer that is not a success: ours (ApiError), aiohttp's (404, 405, 413) and a store away
(503 with Retry-After). An unexpected exception is one log line and a 500 without a
traceback; bad input never reaches it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from worker.retry import describe, is_transient

log = structlog.get_logger("worker.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# How long a client should wait before it retries after a 503.
RETRY_AFTER_S = 5

_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_body",
    429: "rate_limited",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers or {}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int, reason: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"error": reason, "detail": detail}, status, headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.reason, exc.detail, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {name: exc.headers[name] for name in ("Allow",) if name in exc.headers}
        reason = _REASONS.get(exc.status, "bad_request")
        return error_response(exc.status, reason, exc.reason.lower(), headers)
    except Exception as exc:
        if is_transient(exc):
            log.warning("api.store_unavailable", path=request.path, error=describe(exc))
            detail = "a store did not answer; retry later"
            return error_response(503, "unavailable", detail, {"Retry-After": str(RETRY_AFTER_S)})
        log.exception("api.failed", method=request.method, path=request.path)
        return error_response(500, "internal", "the request failed; the worker's log has the cause")
