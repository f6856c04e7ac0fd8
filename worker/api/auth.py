"""Who is asking: an admin (`Authorization: Bearer <token>`, a token of `http.admin_tokens`)
or a device (`X-API-Key: <key>`, worker/api/keys.py). Tokens are compared in constant
time; neither a token nor a key is ever put in an answer or a log line."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from aiohttp import web

from worker.api.errors import ApiError
from worker.api.keys import DeviceKeys, KeyOwner


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def require_admin(request: web.Request, tokens: Sequence[str]) -> None:
    """ApiError 401 unless the request carries one of `tokens` (none configured: no admin)."""
    if is_admin(request, tokens):
        return
    detail = "an admin token is needed (Authorization: Bearer …)"
    raise ApiError(401, "unauthorized", detail, {"WWW-Authenticate": 'Bearer realm="iotflow"'})


def is_admin(request: web.Request, tokens: Sequence[str]) -> bool:
    given = bearer_token(request)
    return given is not None and any(hmac.compare_digest(given.encode(), t.encode()) for t in tokens)


async def caller(request: web.Request, tokens: Sequence[str], keys: DeviceKeys) -> KeyOwner | None:
    """None for an admin, else the device whose key the request carries; ApiError 401 for
    no credential or a wrong one, 403 for a device that is not active."""
    if is_admin(request, tokens):
        return None
    key = request.headers.get("X-API-Key", "")
    owner = await keys.owner(key) if key else None
    if owner is None:
        detail = "unknown API key" if key else "a device key (X-API-Key) or an admin token is needed"
        raise ApiError(401, "unauthorized", detail, {"WWW-Authenticate": 'Bearer realm="iotflow"'})
    if owner.status != "active":
        raise ApiError(403, "device_disabled", f"the device is {owner.status}")
    return owner
