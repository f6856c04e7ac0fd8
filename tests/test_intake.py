"""The MQTT connection under intake (worker/intake/mqtt_protocol.py), against a real Mosquitto and
HiveMQ CE: framing, batched PUBACKs, the in-process Receive Maximum bound, keepalive, stale acks
and refused subscriptions."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import mqtt5
import pytest

from schemas.records import RawMessage
from worker.config import MqttSettings, Settings
from worker.intake.mqtt import (
    REFUSING_CONNACKS,
    MqttIntake,
    SubscriptionRefused,
    connect,
    connect_packet,
    subscription_filters,
)
from worker.intake.mqtt_protocol import ConnectRefused, MqttConnection, MqttError, open_connection
from worker.metrics import Metrics
from worker.runtime.mailbox import Mailbox
from worker.tools.embedded import free_port

from .helpers import background, password_mosquitto, publish, stop_process, wait_listening
from .tcpproxy import TcpProxy

_ids = itertools.count()


def test_shared_group_prefixes_every_filter() -> None:
    settings = MqttSettings(topics=["a/+", "b/#"], shared_group="grp")
    assert subscription_filters(settings) == ["$share/grp/a/+", "$share/grp/b/#"]
    assert subscription_filters(MqttSettings(topics=["a/+"])) == ["a/+"]


async def test_packets_split_anywhere_across_reads_are_parsed_whole() -> None:
    first = mqtt5.PublishPacket("t/1", b"x" * 300, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=1).write()
    second = mqtt5.PublishPacket("t/2", b"", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=2).write()
    wire = first + mqtt5.PingRespPacket().write() + second
    for cut in range(1, len(wire)):  # every split point, the remaining-length bytes included
        for cut2 in (cut, min(cut + 1, len(wire)), len(wire)):
            connection = MqttConnection(receive_maximum=10)
            for part in (wire[:cut], wire[cut:cut2], wire[cut2:]):
                if part:
                    connection.data_received(part)
            assert [(p.topic, p.payload, p.packet_id) for p in connection.inbox] == [
                ("t/1", b"x" * 300, 1),
                ("t/2", b"", 2),
            ], cut
            assert connection.in_flight == 2 and connection.error is None


async def test_a_malformed_packet_fails_the_connection() -> None:
    connection = MqttConnection(receive_maximum=10)
    connection.data_received(b"\x30\x01\xff")  # a PUBLISH too short to hold its topic length
    assert isinstance(connection.error, MqttError)
    with pytest.raises(MqttError, match="malformed"):
        await connection.take()


def _topic(tag: str) -> str:
    return f"intake-test/{os.getpid()}/{tag}"


async def _session(url: str, client_id: str, receive_maximum: int, keepalive: int = 30) -> MqttConnection:
    parsed = urlparse(url)
    packet = mqtt5.ConnectPacket(
        client_id,
        clean_start=False,
        keep_alive=keepalive,
        session_expiry_interval=60,
        receive_max=receive_maximum,
    )
    connection, _ = await open_connection(parsed.hostname or "127.0.0.1", parsed.port or 1883, packet)
    return connection


async def _take(connection: MqttConnection, count: int) -> list[mqtt5.PublishPacket]:
    taken: list[mqtt5.PublishPacket] = []
    async with asyncio.timeout(20):
        while len(taken) < count:
            taken += await connection.take()
    return taken


async def test_batched_acks_end_redelivery_and_the_bound_holds(mqtt_url: str) -> None:
    """More than Receive Maximum waits in the broker; one acknowledge() of a batch frees the
    window, and after a reconnect the broker redelivers exactly what was not acknowledged."""
    url, client_id, topic = mqtt_url, f"intake-batch-{next(_ids)}", _topic("batch")
    bound, total = 50, 400
    connection = await _session(url, client_id, bound)
    try:
        assert await connection.subscribe([f"{topic}/#"]) == [1]
        await publish(url, [(f"{topic}/{n}", str(n).encode()) for n in range(total)])
        received: list[bytes] = []
        while len(received) < total - 10:
            batch = await _take(connection, 1)
            assert connection.in_flight <= bound
            received += [p.payload for p in batch]
            # Acknowledge all but the last ten ever received: the window must still move on.
            ack_now = [p.packet_id or 0 for p in batch if int(p.payload) < total - 10]
            assert connection.acknowledge(ack_now) == len(ack_now)
        assert connection.peak_in_flight <= bound
    finally:
        await connection.close()
    assert received[: total - 10] == [str(n).encode() for n in range(total - 10)]
    again = await _session(url, client_id, bound)
    try:
        redelivered = await _take(again, 10)
        assert sorted(int(p.payload) for p in redelivered) == list(range(total - 10, total))
        assert all(p.duplicate for p in redelivered if int(p.payload) < len(received))
        assert not again.inbox  # nothing acknowledged came back (the broker sends them in one go)
        again.acknowledge([p.packet_id or 0 for p in redelivered])
    finally:
        await again.close()


async def test_parsing_stops_at_the_bound_and_resumes_after_the_acks() -> None:
    """Mosquitto 2.0 may send past our Receive Maximum once PUBACKs flow (docs/performance.md),
    so the bound is ours: here a peer on a socket pair sends 25 messages against a bound of 10."""
    ours, peer = socket.socketpair()
    peer.settimeout(10)
    _, connection = await asyncio.get_running_loop().create_connection(
        lambda: MqttConnection(receive_maximum=10), sock=ours
    )
    try:
        peer.sendall(b"".join(_publish(n) for n in range(1, 26)))
        seen: list[int] = []
        for expected in (10, 10, 5):
            batch = await _take(connection, expected)
            assert len(batch) == expected and connection.in_flight == expected
            assert not connection.inbox  # nothing past the bound was parsed meanwhile
            seen += [p.packet_id or 0 for p in batch]
            assert connection.acknowledge([p.packet_id or 0 for p in batch]) == expected
            wire = b"".join(mqtt5.PubAckPacket(p.packet_id or 0).write() for p in batch)
            assert _recv_exactly(peer, len(wire)) == wire  # one batch of PUBACKs, in order
        assert seen == list(range(1, 26)) and connection.peak_in_flight == 10
    finally:
        peer.close()
        await connection.close(timeout=1)


def _publish(packet_id: int) -> bytes:
    return mqtt5.PublishPacket("t", b"x", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=packet_id).write()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the connection closed"
        data += chunk
    return data


async def test_keepalive_pings_an_idle_broker_and_detects_a_dead_one(mqtt_url: str) -> None:
    parsed = urlparse(mqtt_url)
    proxy = TcpProxy(parsed.hostname or "127.0.0.1", parsed.port or 1883)
    await proxy.start()
    topic = _topic("keepalive")
    try:
        connection = await _session(
            f"mqtt://127.0.0.1:{proxy.port}", f"intake-ka-{next(_ids)}", 10, keepalive=1
        )
        try:
            await connection.subscribe([topic])
            # Idle for three keepalives: a broker drops a client silent for 1.5 of them, so the
            # connection still working afterwards shows the PINGREQs went out.
            await asyncio.sleep(3)
            await publish(mqtt_url, [(topic, b"still here")])
            assert [p.payload for p in await _take(connection, 1)] == [b"still here"]
            proxy.mute()  # the broker hangs: TCP stays up, our PINGREQs go in, nothing comes back
            with pytest.raises(MqttError, match="keepalive"):
                async with asyncio.timeout(20):
                    await connection.take()
        finally:
            await connection.close(timeout=1)
    finally:
        proxy.thaw()
        await proxy.stop()


@pytest.fixture
async def intake(broker_settings: Settings) -> AsyncIterator[tuple[MqttIntake, Mailbox[RawMessage]]]:
    settings = broker_settings
    settings.mqtt = replace(settings.mqtt, topics=[f"{_topic('gen')}/#"], reconnect_min_s=0.05)
    mailbox: Mailbox[RawMessage] = Mailbox(1000)
    actor = MqttIntake(settings.mqtt, mailbox, Metrics())
    async with background(actor.run()) as running:
        await asyncio.wait_for(actor.subscribed.wait(), 20)
        yield actor, mailbox
        await actor.stop()
        await actor.close()
        await asyncio.wait_for(running, 20)


async def test_acks_of_an_earlier_connection_are_skipped_and_redelivered(
    broker_settings: Settings, intake: tuple[MqttIntake, Mailbox[RawMessage]]
) -> None:
    """One message: HiveMQ sends a session's next messages only once those out are all
    acknowledged (docs/brokers.md), so a second one would not come before the first's ack."""
    actor, mailbox = intake
    topic = f"{_topic('gen')}/m"
    await publish(broker_settings.mqtt.url, [(topic, b"1")])
    old = await _gather(mailbox, 1)
    assert actor.unacknowledged == 1
    connection = actor._connection
    assert connection is not None
    connection.abort()  # the connection drops; intake reconnects to the same session
    again = await _gather(mailbox, 1)
    assert [m.payload for m in again] == [b"1"]
    assert {m.ack.generation for m in again} == {old[0].ack.generation + 1}
    assert actor.ack([m.ack for m in old]) == 0  # stale: the broker has sent it again
    assert actor.unacknowledged == 1
    assert actor.ack([m.ack for m in again]) == 1
    assert actor.unacknowledged == 0


async def _gather(mailbox: Mailbox[RawMessage], count: int) -> list[RawMessage]:
    items: list[RawMessage] = []
    async with asyncio.timeout(20):
        while len(items) < count:
            items += await mailbox.get_batch(count, None)
    return items


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[int]:
    """A Mosquitto that admits `us@er` with password `p:ss` and nobody else."""
    with password_mosquitto(tmp_path, "us@er", "p:ss") as port:
        yield port


async def test_the_credentials_come_from_the_url_and_a_wrong_one_is_refused(password_broker: int) -> None:
    good = MqttSettings(
        url=f"mqtt://us%40er:p%3Ass@127.0.0.1:{password_broker}", client_id=f"pw-{next(_ids)}"
    )
    packet = connect_packet(good)
    assert (packet.username, packet.password, packet.clean_start) == ("us@er", b"p:ss", False)
    assert (packet.session_expiry_interval, packet.receive_max) == (
        good.session_expiry_s,
        good.receive_maximum,
    )
    connection = await connect(good)
    await connection.close()
    wrong = replace(good, url=f"mqtt://us%40er:nope@127.0.0.1:{password_broker}")
    with pytest.raises(ConnectRefused) as refused:
        await connect(wrong)
    assert refused.value.code in REFUSING_CONNACKS, refused.value


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[int]:
    """A Mosquitto with its dynamic-security plugin (the one way Mosquitto 2.0 refuses a
    SUBSCRIBE): client `reader` may subscribe to `allowed/#` only."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    ctrl = shutil.which("mosquitto_ctrl")
    plugins = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
    if ctrl is None or not plugins:
        pytest.skip(
            "needs mosquitto_ctrl and Mosquitto's dynamic-security plugin (Debian's mosquitto has both)"
        )
    config = tmp_path / "dynsec.json"
    subprocess.run(
        [ctrl, "dynsec", "init", str(config), "admin", "admin-pw"], check=True, capture_output=True
    )
    port = free_port()
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous false",
        f"plugin {plugins[0]}",
        f"plugin_opt_config_file {config}",
    ]
    if os.geteuid() == 0:
        lines.insert(0, "user root")
    (tmp_path / "mosquitto.conf").write_text("\n".join(lines) + "\n")
    broker = subprocess.Popen([mosquitto, "-c", str(tmp_path / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, broker)
        admin = [ctrl, "-h", "127.0.0.1", "-p", str(port), "-u", "admin", "-P", "admin-pw", "dynsec"]
        for command in (
            ["createClient", "reader", "-p", "reader-pw"],
            ["createRole", "readers"],
            ["addRoleACL", "readers", "subscribePattern", "allowed/#", "allow"],
            ["addClientRole", "reader", "readers"],
        ):
            subprocess.run(admin + command, check=True, capture_output=True, timeout=30)
        yield port
    finally:
        stop_process(broker)


@pytest.mark.parametrize("broker", ["mosquitto", "hivemq"])
async def test_a_refused_subscription_is_a_refusal_not_an_outage(
    broker: str, request: pytest.FixtureRequest
) -> None:
    """Mosquitto refuses by its dynamic-security ACL; the suite's HiveMQ by its test extension,
    which refuses every filter under denied/ (worker/tools/servers/hivemq.py)."""
    if broker == "mosquitto":
        url = f"mqtt://reader:reader-pw@127.0.0.1:{request.getfixturevalue('acl_broker')}"
    else:
        url = request.getfixturevalue("hivemq_server").url
    settings = MqttSettings(url=url, topics=["allowed/+", "denied/#"], client_id=f"acl-{next(_ids)}")
    actor = MqttIntake(settings, Mailbox(10), Metrics())
    with pytest.raises(SubscriptionRefused, match="denied/#") as refused:
        await asyncio.wait_for(actor.run(), 20)
    assert "not authorized" in str(refused.value) and "allowed/+" not in str(refused.value)
    assert not actor.connected
