"""`POST /api/v1/devices/register` (admin): a device row, its first API key and its default
config document, answered once all three are stored."""

from __future__ import annotations

import math
from typing import Any

import orjson
import structlog
from aiohttp import web

from worker.api.errors import ApiError, json_response
from worker.api.keys import new_key, set_key
from worker.retry import describe, is_transient
from worker.rules.model import Scope
from worker.rules.source import COLLECTION as CONFIGS
from worker.stores import Stores
from worker.stores.devices import (
    BadSpec,
    DeviceConflict,
    DeviceSpec,
    add_devices,
    datapoint_spec,
    device_spec,
)
from worker.stores.devices import forget_cached as forget_device_cache

log = structlog.get_logger("worker.api")

_FIELDS = {"device_key", "name", "mac", "user", "datapoints"}
_POINT_FIELDS = {"label", "unit", "min", "max"}


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object; ApiError 400 (not JSON) or 422 (not an object)."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_body", "the body must be a JSON object")
    return body


def _text(body: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ApiError(422, "invalid_body", f"{name} must be a string")
    return value


def _bound(point: dict[str, Any], name: str) -> float | None:
    value = point.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(422, "invalid_body", f"datapoints: {name} must be a finite number")
    return float(value)


def registration(body: dict[str, Any]) -> DeviceSpec:
    """The device the body asks for; ApiError 422 naming the first problem."""
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ApiError(
            422, "invalid_body", f"unknown field {unknown[0]} (one of {', '.join(sorted(_FIELDS))})"
        )
    points = body.get("datapoints") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ApiError(422, "invalid_body", "datapoints must be a list of objects")
    try:
        specs = []
        for point in points:
            extra = sorted(set(point) - _POINT_FIELDS)
            if extra:
                raise ApiError(422, "invalid_body", f"datapoints: unknown field {extra[0]}")
            label = _text(point, "label", required=True)
            assert label is not None
            specs.append(
                datapoint_spec(label, _text(point, "unit"), _bound(point, "min"), _bound(point, "max"))
            )
        key = _text(body, "device_key", required=True)
        assert key is not None
        return device_spec(key, _text(body, "mac"), _text(body, "name"), _text(body, "user"), specs)
    except BadSpec as exc:
        raise ApiError(422, "invalid_device", str(exc)) from None


async def register(stores: Stores, spec: DeviceSpec) -> tuple[int, str]:
    """Store the device, its key and its config document; (device id, API key). ApiError 409
    when the key (or the MAC) is taken: nothing is stored then."""
    key = new_key()
    async with stores.postgres.acquire() as conn, conn.transaction():
        try:
            (added,) = await add_devices(conn, [spec])
        except DeviceConflict as exc:
            raise ApiError(409, "device_exists", str(exc)) from None
        if not added.created:
            raise ApiError(409, "device_exists", f"device {spec.key} exists (id {added.device_id})")
        await set_key(conn, added.device_id, key)
        user_id = await conn.fetchval("SELECT user_id FROM devices WHERE id = $1", added.device_id)
        # Before the commit: should the document store fail, no device is left without one.
        scope = Scope("device", added.device_id)
        config = {"device_id": added.device_id, "user_id": user_id, "config_version": 1, "settings": {}}
        await stores.documents.insert(CONFIGS, scope.key, config)
    try:  # a worker that met the device as a stranger forgets it (docs/devices.md)
        await forget_device_cache(stores.redis, stores.keys, [(spec.key, spec.mac)])
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("api.cache_not_cleared", device_id=added.device_id, error=describe(exc))
    return added.device_id, key


def register_handler(stores: Stores) -> Any:
    async def handle(request: web.Request) -> web.Response:
        spec = registration(await json_object(request))
        device_id, key = await register(stores, spec)
        log.info("api.device_registered", device_id=device_id, device_key=spec.key)
        return json_response({"device_id": device_id, "device_key": spec.key, "api_key": key}, 201)

    return handle
