"""The device API as the HTTP tests call it: an admin token, a device registered over the
API, and a client holding that device's key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

TOKEN = "tok-" + "b" * 32
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


async def register(client: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> dict[str, Any]:
    """`POST /devices/register` as the admin: the answer (device_id, device_key, api_key)."""
    async with client.post(f"{base}/devices/register", json=body, headers=ADMIN) as response:
        assert response.status == 201, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


@dataclass
class Api:
    base: str  # http://127.0.0.1:PORT/api/v1
    client: aiohttp.ClientSession
    device_id: int
    key: str  # the device's API key
    other_key: str = ""  # another device's, where a test has two

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.client.get(f"{self.base}{path}", headers=headers or {}) as response:
            return response.status, await response.json()

    async def post(
        self, body: bytes | Any, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """`POST /telemetry`, with the device's key unless `headers` are given."""
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        headers = {"X-API-Key": self.key} if headers is None else headers
        async with self.client.post(f"{self.base}/telemetry", data=data, headers=headers) as response:
            return response.status, dict(response.headers), await response.json()
