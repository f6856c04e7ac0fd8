"""`POST /api/v1/telemetry` (a device key): the body is the device's JSON telemetry, taken
as if published on `devices/{device_key}/telemetry` (worker/intake/http.py), and answered
once stored: 200 with the readings, or the dead letter's reason (stored as a dead letter)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from schemas.records import Reason
from worker.api.errors import RETRY_AFTER_S, ApiError, json_response
from worker.intake.http import Busy, HttpIntake, Unavailable

# Reading a body slower than this (a slow or stalled client) is answered 408: a connection
# cannot hold a request, and its memory, open at its own pace.
BODY_TIMEOUT_S = 10.0
# Requests in progress at once; one more is answered 503 at once instead of queueing.
MAX_IN_FLIGHT = 1024

_CLIENT_ERRORS = {Reason.BAD_JSON: 400, Reason.TOO_LARGE: 413, Reason.RATE_LIMITED: 429}


def _unavailable(detail: str) -> ApiError:
    return ApiError(503, "unavailable", detail, {"Retry-After": str(RETRY_AFTER_S)})


class TelemetryRoute:
    def __init__(self, intake: Callable[[], HttpIntake | None], rate_window_s: float) -> None:
        self._intake = intake
        self._rate_window_s = rate_window_s
        self._in_flight = 0

    async def post(self, request: web.Request, device_key: str) -> web.StreamResponse:
        if self._in_flight >= MAX_IN_FLIGHT:
            raise _unavailable(f"{MAX_IN_FLIGHT} requests are in progress")
        self._in_flight += 1
        try:
            return await self._post(request, device_key)
        finally:
            self._in_flight -= 1

    async def _post(self, request: web.Request, device_key: str) -> web.StreamResponse:
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = await request.read()
        except TimeoutError:
            raise ApiError(408, "timeout", f"the body did not arrive within {BODY_TIMEOUT_S:g} s") from None
        intake = self._intake()
        if intake is None:
            raise _unavailable("the pipeline is starting")
        try:
            outcome = await intake.submit(f"devices/{device_key}/telemetry", body)
        except Busy:
            raise _unavailable("the pipeline is full") from None
        except Unavailable:
            raise _unavailable("the pipeline restarted before storing it; send it again") from None
        dead = outcome.dead_letter
        if dead is None:
            return json_response({"accepted": outcome.readings})
        status = _CLIENT_ERRORS.get(dead.reason, 422)
        headers = {"Retry-After": str(max(1, round(self._rate_window_s)))} if status == 429 else None
        raise ApiError(status, str(dead.reason), dead.detail, headers)
