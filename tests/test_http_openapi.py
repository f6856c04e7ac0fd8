"""The OpenAPI document at /api/v1/openapi.json is the router's: every route served is
documented, every documented operation is served, and each names only security schemes
and statuses the document defines."""

from __future__ import annotations

from dataclasses import replace

import aiohttp

from worker.api.app import api_app
from worker.api.openapi import DOCUMENT
from worker.config import Settings

from .helpers import running_daemon


def _served(settings: Settings) -> set[tuple[str, str]]:
    app = api_app(settings, lambda: None, lambda: None)
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        routes.add((info.get("path") or info.get("formatter", ""), route.method.lower()))
    return routes


def test_the_document_lists_exactly_the_routes_served(settings: Settings) -> None:
    documented = {(path, method) for path, ops in DOCUMENT["paths"].items() for method in ops}
    assert documented == _served(settings)
    schemes = set(DOCUMENT["components"]["securitySchemes"])
    for path, ops in DOCUMENT["paths"].items():
        for method, op in ops.items():
            for requirement in op["security"]:
                assert set(requirement) <= schemes, (path, method)
            assert op["responses"] and all(code.isdigit() for code in op["responses"]), (path, method)
            if op["security"]:
                assert "401" in op["responses"], (path, method)


async def test_the_daemon_serves_the_document(settings: Settings) -> None:
    settings.http = replace(settings.http, enabled=True, port=0, api=True)
    async with running_daemon(settings) as daemon, aiohttp.ClientSession() as client:
        assert daemon.http is not None
        async with client.get(f"http://127.0.0.1:{daemon.http.port}/api/v1/openapi.json") as response:
            assert response.status == 200 and await response.json() == DOCUMENT
