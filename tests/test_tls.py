"""MQTT over TLS with client certificates (mTLS), against a real Mosquitto with the
certificates `deploy/certs/make-certs.sh` makes."""

from __future__ import annotations

import asyncio
import contextlib
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
    with (tmp_path / "mosquitto.log").open("wb") as log:  # a pipe nobody reads could fill up
        broker = subprocess.Popen([mosquitto, "-c", str(config)], stdout=log, stderr=log)
    try:
        _wait_listening(port, broker)
        yield port, tmp_path
    finally:
        broker.terminate()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()


def _wait_listening(port: int, broker: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if broker.poll() is not None:
                raise AssertionError(f"mosquitto exited with {broker.returncode}") from None
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
    now_ms = int(time.time() * 1000)
    async with running_daemon(settings) as daemon:
        assert daemon.pipeline is not None and daemon.pipeline.intake.connected
        async with aiomqtt.Client("localhost", port, tls_params=tls(certs, "device")) as device:
            for n in range(20):
                # Each its own timestamp: without one, two messages read together could share
                # a receive time and become one row.
                values = {"temperature": 20 + n / 10, "humidity": 50}
                payload = orjson.dumps({"ts": now_ms - 20 + n, "values": values})
                await device.publish("devices/sim-json-02/telemetry", payload, qos=1)
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 40)


# MQTT 3.1.1 CONNECT (clean session, keepalive 60 s, client id "probe") and its CONNACK.
CONNECT = b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05probe"
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


async def _answer_to_connect(port: int, context: ssl.SSLContext) -> bytes | BaseException:
    """What the broker answers a CONNECT over TLS with: bytes, or the error that ended it."""
    try:
        reader, writer = await asyncio.open_connection("localhost", port, ssl=context)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc
    try:
        writer.write(CONNECT)
        await writer.drain()
        return await reader.read(4)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def test_the_broker_really_demands_client_certificates(tls_broker: tuple[int, Path]) -> None:
    # Checked on the wire: aiomqtt only logs the TLS alert and waits for its connect timeout,
    # which a slow broker could hit too.
    port, certs = tls_broker
    with_cert = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with_cert.load_cert_chain(certs / "device.crt", certs / "device.key")
    assert await asyncio.wait_for(_answer_to_connect(port, with_cert), 20) == CONNACK_ACCEPTED
    without = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    answer = await asyncio.wait_for(_answer_to_connect(port, without), 20)
    assert answer == b"" or isinstance(answer, ssl.SSLError | ConnectionError), answer
