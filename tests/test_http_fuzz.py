"""The served OpenAPI document, fuzzed with schemathesis against a real daemon: every
operation, valid and invalid input, with an admin token and with a device key. No 500,
no status or body the document does not give, no traceback or error in the daemon's log,
and every documented status is answered by the fuzz or by a request of this test."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from worker.api.openapi import DOCUMENT
from worker.config import Settings
from worker.ops.certs import CertStore
from worker.tools.embedded import free_port

from .helpers import worker_process

TOKEN = "tok-" + "f" * 32
MAC = "aa:bb:cc:00:00:01"  # fuzzed-1's
RATE_LIMIT = 30  # messages per device and minute
# Bounded: a few hundred requests in all, the same ones every run.
FUZZ = ["--max-examples", "25", "--seed", "1", "--generation-deterministic", "--no-shrink", "--workers", "1"]
FUZZ += ["--phases", "examples,coverage,fuzzing", "--checks", "all"]
FUZZ += [
    "--exclude-checks",
    "ignored_auth,use_after_free,ensure_resource_availability,positive_data_acceptance",
]
FUZZ += ["--request-timeout", "15", "--suppress-health-check", "all", "--no-color"]


async def _schemathesis(url: str, headers: dict[str, str], har: Path) -> tuple[int, str]:
    command = [str(Path(sys.executable).parent / "st"), "run", url, *FUZZ, "--report", "har"]
    command += ["--report-har-path", str(har)]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=har.parent
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode(errors="replace")


def _answered(har: Path) -> set[tuple[str, str, str]]:
    """(method, path template, status) of every request in a HAR report."""
    found = set()
    for entry in orjson.loads(har.read_bytes())["log"]["entries"]:
        method = entry["request"]["method"].lower()
        path = entry["request"]["url"].split("/api/v1", 1)[1].split("?", 1)[0]
        found.add((method, _template(path, method), str(entry["response"]["status"])))
    return found


def _template(path: str, method: str) -> str:
    parts = path.split("/")
    for template, ops in DOCUMENT["paths"].items():
        pattern = template.split("/")
        same = len(pattern) == len(parts) and all(
            p == q or p.startswith("{") for p, q in zip(pattern, parts, strict=True)
        )
        if method in ops and same:
            return template
    return path


# Statuses no request of this test reaches: 503 needs a store or the pipeline away
# (tests/test_http_telemetry.py stops it), 408 a body stalled for 10 s.
NOT_PRACTICAL = {"503", "408"}
BIG = b"[" + b"1," * (150 * 1024) + b"1]"  # over the 256 KiB a body may have


def _probes(key: str, other_key: str) -> list[tuple[str, str, dict[str, str], bytes | None, int]]:
    """Requests for what random input seldom hits: a device that exists, a missing credential,
    a stale version, a body too large, a device over its rate limit. (method, path, headers,
    body, the status it must get)."""
    admin = {"Authorization": f"Bearer {TOKEN}"}
    device, other = {"X-API-Key": key}, {"X-API-Key": other_key}
    reading = orjson.dumps({"ts": int(time.time() * 1000) - 5_000, "values": {"temperature": 21.5}})
    config = orjson.dumps({"settings": {}})
    probes: list[tuple[str, str, dict[str, str], bytes | None, int]] = []
    for path in ("/devices/fuzzed-1/status", "/telemetry/fuzzed-1", "/devices/fuzzed-1/config"):
        probes += [("get", path, admin, None, 200), ("get", path, device, None, 200)]
        probes += [("get", path, {}, None, 401), ("get", path, other, None, 403)]
        probes.append(("get", path.replace("fuzzed-1", "nobody"), admin, None, 404))
    probes += [
        ("get", "/openapi.json", {}, None, 200),
        ("get", "/telemetry/fuzzed-1?start=yesterday", admin, None, 400),
        ("post", "/devices/register", admin, orjson.dumps({"device_key": "fuzzed-1"}), 409),
        ("post", "/devices/register", admin, BIG, 413),
        ("post", "/devices/register", {}, b"{}", 401),
        ("post", "/telemetry", device, BIG, 413),
        ("post", "/telemetry", {}, reading, 401),
        ("post", "/telemetry", admin, reading, 403),
        ("post", "/telemetry", other, reading, 200),
        ("put", "/devices/fuzzed-1/config", admin, config, 200),
        ("put", "/devices/fuzzed-1/config", {**admin, "If-Match": '"999"'}, config, 412),
        ("put", "/devices/fuzzed-1/config", admin, b"{", 400),
        ("put", "/devices/fuzzed-1/config", admin, b'{"rules": 1}', 422),
        ("put", "/devices/fuzzed-1/config", admin, BIG, 413),
        ("put", "/devices/fuzzed-1/config", {}, config, 401),
        ("put", "/devices/nobody/config", admin, config, 404),
        ("post", f"/certs/devices/{MAC}", admin, None, 201),
        ("post", f"/certs/devices/{MAC}", admin, None, 409),
        ("post", "/certs/devices/aa:bb:cc:dd:ee:ff", admin, None, 404),
        ("post", "/certs/devices/nope", admin, None, 422),
        ("post", f"/certs/devices/{MAC}", {}, None, 401),
    ]
    return probes


async def _over_the_limit(client: aiohttp.ClientSession, base: str, key: str) -> int:
    """Posts until the device is refused (a window may turn meanwhile: then it takes more)."""
    for n in range(3 * RATE_LIMIT):
        reading = {"ts": int(time.time() * 1000) - 5_000 - n, "values": {"temperature": 21.5}}
        async with client.post(f"{base}/telemetry", json=reading, headers={"X-API-Key": key}) as response:
            if response.status != 200:
                return response.status
    return 200


async def test_the_openapi_document_survives_schemathesis(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    CertStore(tmp_path / "certs").init()
    env = {
        "IOTFLOW_HTTP_CA_DIR": str(tmp_path / "certs"),
        "IOTFLOW_HTTP_ENABLED": "true",
        "IOTFLOW_HTTP_PORT": str(port),
        "IOTFLOW_HTTP_API": "true",
        "IOTFLOW_HTTP_ADMIN_TOKENS": TOKEN,
        "IOTFLOW_PIPELINE_RATE_LIMIT_MESSAGES": str(RATE_LIMIT),
    }
    async with worker_process(settings, **env) as daemon:
        await daemon.wait_for_event("supervisor.ready")
        base = f"http://127.0.0.1:{port}/api/v1"
        admin = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as client:
            keys = []
            for name, mac in (("fuzzed-1", MAC), ("fuzzed-2", None)):
                body: dict[str, Any] = {"device_key": name, "datapoints": [{"label": "temperature"}]}
                body |= {"mac": mac} if mac else {}
                async with client.post(f"{base}/devices/register", json=body, headers=admin) as response:
                    assert response.status == 201
                    keys.append((await response.json())["api_key"])
            answered = {("post", "/devices/register", "201")}
            for name, headers in {"admin": admin, "device": {"X-API-Key": keys[0]}}.items():
                code, out = await _schemathesis(f"{base}/openapi.json", headers, tmp_path / f"{name}.har")
                assert code == 0, f"schemathesis as {name}:\n{out[-6000:]}"
                answered |= _answered(tmp_path / f"{name}.har")
            for method, path, headers, data, expected in _probes(*keys):
                async with client.request(method, base + path, headers=headers, data=data) as response:
                    assert expected in (0, response.status), (
                        method,
                        path,
                        response.status,
                        await response.text(),
                    )
                    answered.add((method, _template(path.split("?")[0], method), str(response.status)))
            answered.add(("post", "/telemetry", str(await _over_the_limit(client, base, keys[1]))))
        log = daemon.output
    assert "Traceback" not in log
    errors = [r for r in daemon.records() if r.get("level") in ("error", "critical")]
    assert not errors, errors
    documented = {
        (method, path, status)
        for path, ops in DOCUMENT["paths"].items()
        for method, op in ops.items()
        for status in op["responses"]
    }
    assert not {(m, p, status) for m, p, status in documented - answered if status not in NOT_PRACTICAL}
