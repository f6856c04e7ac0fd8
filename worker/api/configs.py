"""`GET`/`PUT /api/v1/devices/{id}/config`: the device's config document (`device_configs`,
key `device:{id}`), versioned by `config_version`, which is its ETag. A PUT replaces the
`settings` (the rules in it are checked as `iotflow rules` checks them, and running
workers are told to reload them); with `If-Match`, only the version it names is replaced,
and of two writes of one version (with or without `If-Match`) only the first succeeds."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from worker.api.errors import ApiError, json_response
from worker.rules.admin import RuleAdmin
from worker.rules.model import Scope, parse_settings
from worker.rules.source import COLLECTION
from worker.stores import Stores


def _etag(version: int) -> str:
    return f'"{version}"'


async def _current(stores: Stores, device: asyncpg.Record) -> dict[str, Any]:
    doc = await stores.documents.get(COLLECTION, Scope("device", int(device["id"])).key)
    if doc is None:  # registered before registration made one, or added with the CLI
        return {"device_id": device["id"], "user_id": device["user_id"], "config_version": 0, "settings": {}}
    return {key: value for key, value in doc.items() if key != "_id"}


async def get_config(stores: Stores, device: asyncpg.Record) -> web.Response:
    doc = await _current(stores, device)
    return json_response(doc, headers={"ETag": _etag(int(doc.get("config_version") or 0))})


async def put_config(stores: Stores, device: asyncpg.Record, request: web.Request, body: Any) -> web.Response:
    if not isinstance(body, dict) or set(body) != {"settings"} or not isinstance(body["settings"], dict):
        raise ApiError(422, "invalid_body", 'the body must be {"settings": {…}}')
    scope = Scope("device", int(device["id"]))
    _, errors = parse_settings(body["settings"], scope)
    if errors:
        raise ApiError(422, "invalid_config", str(errors[0]))
    wanted = request.headers.get("If-Match")
    while True:
        doc = await _current(stores, device)
        version = int(doc.get("config_version") or 0)
        if wanted is not None and wanted.strip() not in ("*", _etag(version)):
            raise ApiError(412, "stale_config", f"the config is at version {version} now ({_etag(version)})")
        doc.update(settings=body["settings"], config_version=version + 1)
        # Compare-and-set: of two PUTs that read this version, only one writes it. The other
        # reads again: its If-Match names a version that is gone (412), or it had none.
        if await stores.documents.replace_versioned(COLLECTION, scope.key, doc, "config_version", version):
            break
    await RuleAdmin(stores).announce(scope.key)
    return json_response(doc, headers={"ETag": _etag(version + 1)})
