"""Who is asking: an admin (`Authorization: Bearer <token>`, a token of `http.admin_tokens`)
or a device (`X-API-Key: <key>`, worker/api/keys.py). Tokens are compared in constant
time; neither a token nor a key is ever put in an answer or a log line."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from aiohttp import web

from worker.api.errors import ApiError


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def require_admin(request: web.Request, tokens: Sequence[str]) -> None:
    """ApiError 401 unless the request carries one of `tokens` (none configured: no admin)."""
    given = bearer_token(request)
    if given is not None and any(hmac.compare_digest(given.encode(), t.encode()) for t in tokens):
        return
    detail = "an admin token is needed (Authorization: Bearer …)"
    raise ApiError(401, "unauthorized", detail, {"WWW-Authenticate": 'Bearer realm="iotflow"'})
