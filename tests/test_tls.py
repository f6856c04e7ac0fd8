"""MQTT over TLS with client certificates (mTLS), against a real Mosquitto configured as in
production: the certificates, the CRL and the ACL all made by `iotflow certs`, then
`require_certificate true`, `use_identity_as_username true`, `crlfile` and `acl_file`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiomqtt
import asyncpg
import pytest

from worker.config import Settings
from worker.decode.codecs import load_codecs
from worker.tools.embedded import free_port
from worker.tools.simulate import build_fleet, message_stream, readings_per_message

from .helpers import running_daemon, stop_process, wait_for_count, wait_listening

ROOT = Path(__file__).parent.parent
DEVICE = "f2-aabbccddee01"  # the simulator's first F2 controller, registered by the fixture
OTHER_DEVICE = "f2-aabbccddee02"
REVOKED = "f2-aabbccddee03"
WORKER = "iotflow-worker"


# A module-scoped fixture: on one worker only (tests/xdist_groups.py).
pytestmark = pytest.mark.shares("tls-module")


@dataclass(frozen=True)
class Broker:
    port: int
    certs: Path


def certs(certs_dir: Path, *args: str) -> None:
    """`iotflow certs VERB … --dir certs_dir`, as an operator runs it."""
    subprocess.run(
        [sys.executable, "-m", "worker", "certs", *args, "--dir", str(certs_dir)],
        check=True,
        capture_output=True,
        cwd=ROOT,
        timeout=60,
    )


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    base = tmp_path_factory.mktemp("tls")
    pki = base / "certs"
    certs(pki, "init", "--days", "30")
    certs(pki, "broker", "localhost", "--san", "127.0.0.1")
    certs(pki, "device", "AA:BB:CC:DD:EE:01", "aa-bb-cc-dd-ee-02", "aabbccddee03")
    certs(pki, "client", WORKER)
    certs(pki, "revoke", REVOKED)
    certs(pki, "acl")  # readers: every valid client certificate, here the worker's
    port = free_port()
    config = base / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        f"cafile {pki / 'ca.crt'}",
        f"certfile {pki / 'server.crt'}",
        f"keyfile {pki / 'server.key'}",
        f"crlfile {pki / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        f"acl_file {pki / 'acl'}",
    ]
    if os.geteuid() == 0:
        lines.insert(0, "user root")  # the keys are 0600, readable by us only
    config.write_text("\n".join(lines) + "\n")
    with (base / "mosquitto.log").open("wb") as log:  # a pipe nobody reads could fill up
        broker = subprocess.Popen([mosquitto, "-c", str(config)], stdout=log, stderr=log)
    try:
        wait_listening(port, broker)
        yield Broker(port, pki)
    finally:
        stop_process(broker)


def tls(certs_dir: Path, name: str | None) -> aiomqtt.TLSParameters:
    return aiomqtt.TLSParameters(
        ca_certs=str(certs_dir / "ca.crt"),
        certfile=str(certs_dir / f"{name}.crt") if name else None,
        keyfile=str(certs_dir / f"{name}.key") if name else None,
        cert_reqs=ssl.CERT_REQUIRED,
    )


_ids = itertools.count()


def client(broker: Broker, name: str | None) -> aiomqtt.Client:
    return aiomqtt.Client(
        "localhost",
        broker.port,
        identifier=f"tls-test-{os.getpid()}-{next(_ids)}",
        tls_params=tls(broker.certs, name),
        timeout=5,
    )


async def test_a_device_with_a_valid_certificate_is_accepted(tls_broker: Broker) -> None:
    async with client(tls_broker, DEVICE) as device:
        await device.publish(f"tele/{DEVICE}/sensor-mode/climate/sensor-room1", b"{}", qos=1)


# MQTT 3.1.1 CONNECT (clean session, keepalive 60 s, client id "probe") and its CONNACK.
CONNECT = b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05probe"
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


async def _answer_to_connect(broker: Broker, name: str | None) -> bytes | BaseException:
    """What the broker answers a CONNECT over TLS with (bytes), or the error that ended it.

    Checked on the wire: aiomqtt only logs a TLS alert and waits for its connect timeout,
    which a slow broker could hit too, so a refusal seen through it proves nothing."""
    context = ssl.create_default_context(cafile=str(broker.certs / "ca.crt"))
    if name is not None:
        context.load_cert_chain(broker.certs / f"{name}.crt", broker.certs / f"{name}.key")
    try:
        reader, writer = await asyncio.open_connection("localhost", broker.port, ssl=context)
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


def _refused(answer: bytes | BaseException) -> bool:
    return answer == b"" or isinstance(answer, ssl.SSLError | ConnectionError)


async def test_the_broker_refuses_a_client_without_a_certificate(tls_broker: Broker) -> None:
    # The positive control first: the same probe with a valid certificate is accepted.
    assert await asyncio.wait_for(_answer_to_connect(tls_broker, DEVICE), 20) == CONNACK_ACCEPTED
    answer = await asyncio.wait_for(_answer_to_connect(tls_broker, None), 20)
    assert _refused(answer), answer


async def test_the_broker_refuses_a_revoked_certificate(tls_broker: Broker) -> None:
    assert await asyncio.wait_for(_answer_to_connect(tls_broker, DEVICE), 20) == CONNACK_ACCEPTED
    answer = await asyncio.wait_for(_answer_to_connect(tls_broker, REVOKED), 20)
    assert _refused(answer), answer


async def test_a_device_publishes_only_under_its_own_identity(tls_broker: Broker) -> None:
    async with client(tls_broker, WORKER) as reader, client(tls_broker, DEVICE) as device:
        await reader.subscribe("#", qos=1)
        # The forbidden ones first: the broker forwards one client's messages in order, so
        # once the last (allowed) one arrives, a forbidden one would have arrived before it.
        await device.publish(f"tele/{OTHER_DEVICE}/sensor-mode/climate/sensor-room1", b"other", qos=1)
        await device.publish("devices/sim-json-01/telemetry", b"other", qos=1)
        await device.publish(f"stat/{DEVICE}/sensor-mode/io/sensor-relay", b"own", qos=1)
        await device.publish(f"devices/{DEVICE}/telemetry", b"own-last", qos=1)
        received = []
        async with asyncio.timeout(10):
            async for message in reader.messages:
                received.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]
                if message.payload == b"own-last":
                    break
    assert received == [
        (f"stat/{DEVICE}/sensor-mode/io/sensor-relay", b"own"),
        (f"devices/{DEVICE}/telemetry", b"own-last"),
    ]


async def test_worker_ingests_over_mutual_tls(
    settings: Settings, pg: asyncpg.Connection, tls_broker: Broker
) -> None:
    pki = tls_broker.certs
    settings.mqtt = replace(
        settings.mqtt,
        url=f"mqtts://localhost:{tls_broker.port}",
        ca_file=str(pki / "ca.crt"),
        cert_file=str(pki / f"{WORKER}.crt"),
        key_file=str(pki / f"{WORKER}.key"),
    )
    codecs = load_codecs()
    stream = message_stream(build_fleet(1), codecs)
    messages = [next(stream) for _ in range(12)]
    assert {topic.split("/")[1] for topic, _ in messages} == {DEVICE}
    async with running_daemon(settings) as daemon:
        assert daemon.pipeline is not None and daemon.pipeline.intake.connected
        async with client(tls_broker, DEVICE) as device:
            for topic, payload in messages:
                await device.publish(topic, payload, qos=1)
        expected = sum(readings_per_message(topic, payload, codecs) for topic, payload in messages)
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", expected)
