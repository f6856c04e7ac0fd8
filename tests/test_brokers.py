"""Brokers other than the suite's Mosquitto: one that does not speak MQTT 5 (the `amqtt` broker,
MQTT 3.1.1 only, and stand-ins that close or stay silent after CONNECT) ends in one line and
exit 2 after a bounded number of tries; credentials from `mqtt.username` / `mqtt.password_file`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import asyncpg
import mqtt5
import pytest

from worker.config import MqttSettings, Settings, load_settings
from worker.intake.mqtt import NO_MQTT5_ANSWER_TRIES, SubscriptionRefused, connect, follow_connack
from worker.intake.mqtt_protocol import NoMqtt5Answer, OlderProtocol, open_connection
from worker.tools.embedded import free_port
from worker.tools.servers import HiveMQServer

from .helpers import password_mosquitto, publish, stop_process, wait_for_count, wait_listening, worker_process
from .test_outages import json_messages
from .test_refusals import _errors, run_to_exit

_ids = itertools.count()


# A module-scoped fixture: on one worker only (tests/xdist_groups.py).
pytestmark = pytest.mark.shares("brokers-module")


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[int]:
    """The `amqtt` broker (MQTT 3.1.1 only) on a free port, anonymous clients allowed."""
    port = free_port()
    config = tmp_path / "amqtt.yaml"
    config.write_text(
        "listeners:\n"
        "  default:\n"
        "    type: tcp\n"
        f"    bind: 127.0.0.1:{port}\n"
        "plugins:\n"
        "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
        "    allow_anonymous: true\n"
    )
    command = shutil.which("amqtt", path=os.path.dirname(sys.executable)) or "amqtt"
    with (tmp_path / "amqtt.log").open("wb") as log:
        broker = subprocess.Popen([command, "-c", str(config)], stdout=log, stderr=log)
    try:
        wait_listening(port, broker)
        yield port
    finally:
        stop_process(broker)


@contextlib.asynccontextmanager
async def fake_broker(answer: str) -> AsyncIterator[int]:
    """A TCP server that reads CONNECT, then closes ("close"), says nothing ("silent") or
    answers with MQTT 3.1.1's CONNACK "unacceptable protocol version" ("v3")."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read(1)
        if answer == "close":
            writer.close()
        elif answer == "v3":
            writer.write(b"\x20\x02\x00\x01")

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


def _connect_packet() -> mqtt5.ConnectPacket:
    return mqtt5.ConnectPacket(f"brokers-{next(_ids)}", clean_start=False, keep_alive=30)


async def test_an_mqtt_311_broker_answers_with_its_own_connack(amqtt_broker: int) -> None:
    with pytest.raises(OlderProtocol, match="unacceptable protocol version") as caught:
        await open_connection("127.0.0.1", amqtt_broker, _connect_packet())
    assert caught.value.return_code == 1


@pytest.mark.parametrize("answer", ["close", "silent"])
async def test_no_connack_is_no_mqtt5_answer_and_leaves_no_future_behind(answer: str) -> None:
    """The CONNACK's waiter is failed when the connection goes: it must not outlive the
    attempt (asyncio would report "Future exception was never retrieved")."""
    async with fake_broker(answer) as port:
        with pytest.raises(NoMqtt5Answer, match=f"127.0.0.1:{port}"):
            await open_connection("127.0.0.1", port, _connect_packet(), timeout=1)


async def _exits_2_naming_mqtt5(settings: Settings, port: int, tries: int = NO_MQTT5_ANSWER_TRIES) -> None:
    code, lines = await run_to_exit(
        settings,
        IOTFLOW_MQTT_URL=f"mqtt://127.0.0.1:{port}",
        IOTFLOW_MQTT_CONNECT_TIMEOUT_S="1",
        IOTFLOW_MQTT_RECONNECT_MIN_S="0.05",
        IOTFLOW_MQTT_RECONNECT_MAX_S="0.2",
    )
    assert code == 2
    errors = _errors(lines)
    assert [e["event"] for e in errors] == ["supervisor.refused", "daemon.stopped"], errors
    assert f"the broker at 127.0.0.1:{port} does not answer MQTT 5" in str(errors[0]["error"]), errors
    retries = [line for line in lines if line.get("event") == "mqtt.disconnected"]
    assert len(retries) == tries - 1, retries


async def test_the_worker_exits_2_against_an_mqtt_311_broker(settings: Settings, amqtt_broker: int) -> None:
    """amqtt gives our CONNECT (with its properties) no answer at all: three tries, then exit 2."""
    await _exits_2_naming_mqtt5(settings, amqtt_broker)


@pytest.mark.parametrize("answer", ["close", "silent", "v3"])
async def test_the_worker_exits_2_when_a_broker_gives_no_connack(settings: Settings, answer: str) -> None:
    """Silence or a close may be an outage: three tries. A 3.1.1 CONNACK is an answer: one."""
    async with fake_broker(answer) as port:
        await _exits_2_naming_mqtt5(settings, port, tries=1 if answer == "v3" else NO_MQTT5_ANSWER_TRIES)


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[int]:
    """A Mosquitto that admits `worker` with password `s3cr:t` and nobody else."""
    with password_mosquitto(tmp_path, "worker", "s3cr:t") as port:
        yield port


async def test_username_and_password_file_settings_log_in(password_broker: int, tmp_path: Path) -> None:
    (tmp_path / "mqtt-password").write_text("s3cr:t\n")
    settings = load_settings(
        environ={
            "IOTFLOW_MQTT_URL": f"mqtt://nobody:wrong@127.0.0.1:{password_broker}",  # the settings win
            "IOTFLOW_MQTT_USERNAME": "worker",
            "IOTFLOW_MQTT_PASSWORD_FILE": str(tmp_path / "mqtt-password"),
            "IOTFLOW_MQTT_CLIENT_ID": f"brokers-pw-{next(_ids)}",
        }
    )
    assert (settings.mqtt.username, settings.mqtt.password) == ("worker", "s3cr:t")
    assert "s3cr:t" not in repr(settings)
    connection = await connect(settings.mqtt)
    await connection.close()


async def test_the_password_setting_is_refused_when_wrong_and_never_logged(
    settings: Settings, password_broker: int
) -> None:
    code, lines = await run_to_exit(
        settings,
        IOTFLOW_MQTT_URL=f"mqtt://127.0.0.1:{password_broker}",
        IOTFLOW_MQTT_USERNAME="worker",
        IOTFLOW_MQTT_PASSWORD="not-the-s3cret",
    )
    assert code == 2
    assert [e["event"] for e in _errors(lines)] == ["supervisor.refused", "daemon.stopped"]
    assert "not-the-s3cret" not in repr(lines)


def test_the_password_setting_defaults_to_the_url() -> None:
    from worker.intake.mqtt import connect_packet

    packet = connect_packet(MqttSettings(url="mqtt://us%40er:p%3Ass@broker:1883"))
    assert (packet.username, packet.password) == ("us@er", b"p:ss")
    packet = connect_packet(MqttSettings(url="mqtt://us%40er:p%3Ass@broker:1883", password="other"))
    assert (packet.username, packet.password) == ("us@er", b"other")


@pytest.mark.parametrize(
    ("announced", "settings", "refusal"),
    [
        ({"max_qos": mqtt5.QoS.AT_MOST_ONCE}, {}, "QoS 0 only"),
        ({"shared_subscription_available": False}, {"shared_group": "g"}, "mqtt.shared_group"),
        ({"wildcard_subscription_available": False}, {"topics": ["a/+"]}, "wildcard"),
    ],
    ids=["qos0-only", "no-shared", "no-wildcards"],
)
def test_a_connack_that_rules_out_intake_is_a_refusal(
    announced: dict[str, object], settings: dict[str, object], refusal: str
) -> None:
    with pytest.raises(SubscriptionRefused, match=refusal):
        follow_connack(MqttSettings(**settings), mqtt5.ConnAckPacket(**announced))  # type: ignore[arg-type]


def test_a_connack_without_what_intake_does_not_use_is_fine() -> None:
    plain = MqttSettings(topics=["devices/x/telemetry"])
    follow_connack(
        plain,
        mqtt5.ConnAckPacket(
            shared_subscription_available=False,
            wildcard_subscription_available=False,
            retain_available=False,
            topic_alias_max=0,
            receive_max=1,
        ),
    )
    follow_connack(MqttSettings(), mqtt5.ConnAckPacket(session_expiry_interval=60))  # shorter: a warning only


ROWS = "SELECT count(*) FROM decoded_data"


async def test_the_session_survives_a_worker_kill_and_broker_restarts(
    settings: Settings, pg: asyncpg.Connection, hivemq_server: HiveMQServer
) -> None:
    """HiveMQ keeps the session and its queued messages on disk across a restart (stopped,
    not killed: what a broker killed -9 had not synced is its own loss); the worker resumes
    it after its own kill -9, and reconnects with backoff while the broker restarts."""
    url = hivemq_server.url
    settings.mqtt = replace(settings.mqtt, url=url)
    async with worker_process(settings, IOTFLOW_MQTT_RECONNECT_MAX_S="1") as worker:
        await worker.wait_for_event("supervisor.ready")
        await publish(url, json_messages(0, 50))
        await wait_for_count(pg, ROWS, 50)
        await worker.kill()
    await publish(url, json_messages(50, 50))  # wait in the worker's session
    await asyncio.to_thread(hivemq_server.stop)
    await asyncio.to_thread(hivemq_server.start)  # the same port, its data kept
    async with worker_process(settings, IOTFLOW_MQTT_RECONNECT_MAX_S="1") as worker:
        await wait_for_count(pg, ROWS, 100, timeout=60)
        await asyncio.to_thread(hivemq_server.stop)  # under the running worker this time
        await asyncio.to_thread(hivemq_server.start)
        await publish(url, json_messages(100, 50))
        await wait_for_count(pg, ROWS, 150, timeout=60)
        assert await worker.terminate() == 0
        assert "mqtt.disconnected" in worker.events()
    assert await pg.fetchval(ROWS) == 150


@pytest.fixture(scope="module")
def hivemq_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HiveMQServer, Path]]:
    """A HiveMQ of its own with a TLS listener too, its certificate made by `iotflow certs`."""
    from .conftest import _session_server
    from .test_tls import certs

    pki = tmp_path_factory.mktemp("hivemq-tls") / "certs"
    certs(pki, "init", "--days", "30")
    certs(pki, "broker", "localhost", "--san", "127.0.0.1")
    make = partial(HiveMQServer, tls=(pki / "server.crt", pki / "server.key"))
    with _session_server(make, "hivemq-tls") as server:
        yield server, pki / "ca.crt"


async def test_intake_reads_hivemq_over_tls(hivemq_tls: tuple[HiveMQServer, Path]) -> None:
    server, ca = hivemq_tls
    settings = MqttSettings(
        url=f"mqtts://localhost:{server.tls_port}", ca_file=str(ca), client_id=f"brokers-tls-{next(_ids)}"
    )
    connection = await connect(settings)
    try:
        assert await connection.subscribe(["tls-test/#"]) == [1]
        await publish(server.url, [("tls-test/1", b"over tls")])  # in by the plain listener
        async with asyncio.timeout(20):
            taken = await connection.take()
        assert [(p.topic, p.payload) for p in taken] == [("tls-test/1", b"over tls")]
        connection.acknowledge([p.packet_id or 0 for p in taken])
    finally:
        await connection.close()
