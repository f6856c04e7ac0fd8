"""MQTT over TLS with client certificates (mTLS), against a real Mosquitto with the
certificates `deploy/certs/make-certs.sh` makes."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiomqtt
import asyncpg
import orjson
import pytest

from worker.config import Settings
from worker.tools.embedded import free_port

from .helpers import running_daemon, wait_for_count

ROOT = Path(__file__).parent.parent


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    subprocess.run(
        ["bash", str(ROOT / "deploy/certs/make-certs.sh"), "-o", str(tmp_path), "worker", "device"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        f"cafile {tmp_path / 'ca.crt'}",
        f"certfile {tmp_path / 'server.crt'}",
        f"keyfile {tmp_path / 'server.key'}",
        "require_certificate true",
        "allow_anonymous true",
    ]
    if os.geteuid() == 0:
        lines.insert(0, "user root")  # the keys in tmp_path are readable by us only
    config.write_text("\n".join(lines) + "\n")
    broker = subprocess.Popen([mosquitto, "-c", str(config)], stderr=subprocess.PIPE)
    try:
        _wait_listening(port)
        yield port, tmp_path
    finally:
        broker.terminate()
        broker.wait(5)


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def tls(certs: Path, name: str) -> aiomqtt.TLSParameters:
    return aiomqtt.TLSParameters(
        ca_certs=str(certs / "ca.crt"),
        certfile=str(certs / f"{name}.crt"),
        keyfile=str(certs / f"{name}.key"),
        cert_reqs=ssl.CERT_REQUIRED,
    )


async def test_worker_ingests_over_mutual_tls(
    settings: Settings, pg: asyncpg.Connection, tls_broker: tuple[int, Path]
) -> None:
    port, certs = tls_broker
    settings.mqtt = replace(
        settings.mqtt,
        url=f"mqtts://localhost:{port}",
        ca_file=str(certs / "ca.crt"),
        cert_file=str(certs / "worker.crt"),
        key_file=str(certs / "worker.key"),
    )
    async with running_daemon(settings) as daemon:
        assert daemon.pipeline is not None and daemon.pipeline.intake.connected
        async with aiomqtt.Client("localhost", port, tls_params=tls(certs, "device")) as device:
            for n in range(20):
                payload = orjson.dumps({"temperature": 20 + n / 10, "humidity": 50})
                await device.publish("devices/sim-json-02/telemetry", payload, qos=1)
                await asyncio.sleep(0.002)  # distinct receive times: flat telemetry has no timestamp
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 40)


async def test_the_broker_really_demands_client_certificates(tls_broker: tuple[int, Path]) -> None:
    port, certs = tls_broker
    plain_tls = aiomqtt.TLSParameters(ca_certs=str(certs / "ca.crt"), cert_reqs=ssl.CERT_REQUIRED)
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("localhost", port, tls_params=plain_tls, timeout=2):
            pass
