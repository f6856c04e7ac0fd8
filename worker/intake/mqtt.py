"""MQTT intake: QoS 1, a persistent MQTT 5 session, and acknowledgement only after storage.

The connection is our own small protocol on the `mqtt5` codec (worker/intake/mqtt_protocol.py):
messages are taken in batches, and the PUBACKs of a committed batch go out in one write.
Flow control comes from MQTT 5's Receive Maximum: the broker never has more than
`receive_maximum` unacknowledged messages out to us, so when storage stalls the
broker holds the rest and this process's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections.abc import Iterable
from urllib.parse import unquote, urlparse

import mqtt5
import structlog

from schemas.records import AckToken, RawMessage
from worker.config import MqttSettings, redact_url
from worker.intake import read_until_stopped
from worker.intake.mqtt_protocol import (
    ConnectRefused,
    MqttConnection,
    MqttError,
    NoMqtt5Answer,
    OlderProtocol,
    open_connection,
    reason_name,
)
from worker.metrics import Metrics
from worker.retry import Backoff, Refused
from worker.runtime.actor import Actor
from worker.runtime.cancel import cancel_and_wait
from worker.runtime.mailbox import Mailbox

log = structlog.get_logger("worker.intake")


class SubscriptionRefused(Refused):
    """The broker refused a topic filter (SUBACK failure): a setting or an ACL to fix."""


# CONNACK codes that are a configuration problem, not an outage: MQTT 5 bad user name or
# password (134), not authorized (135), banned (138), bad authentication method (140).
REFUSING_CONNACKS = {134, 135, 138, 140}
UNSUPPORTED_PROTOCOL_VERSION = 132
# A broker that heard CONNECT this many times in a row without an MQTT 5 CONNACK, and never
# gave one to this process, is taken for one that does not speak MQTT 5 (exit 2, not a retry loop).
NO_MQTT5_ANSWER_TRIES = 3


def tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """For mqtts://: verify the broker against `ca_file` (the system CAs without one) and
    present `cert_file`/`key_file` when set (mTLS)."""
    if urlparse(settings.url).scheme != "mqtts":
        return None
    context = ssl.create_default_context(cafile=settings.ca_file or None)
    if settings.cert_file:
        context.load_cert_chain(settings.cert_file, settings.key_file or None)
    return context


def connect_packet(
    settings: MqttSettings, client_id: str | None = None, *, persistent: bool = True
) -> mqtt5.ConnectPacket:
    """CONNECT for a persistent session: clean_start off, the session kept `session_expiry_s`.
    Not `persistent`: a clean session that ends with the connection (`iotflow check`).
    `mqtt.username` and `mqtt.password` (or its file) win over the URL's."""
    url = urlparse(settings.url)
    username = settings.username or (unquote(url.username) if url.username else "")
    password = settings.password or (unquote(url.password) if url.password else "")
    return mqtt5.ConnectPacket(
        client_id or settings.client_id,
        username=username or None,
        password=password.encode() if password else None,
        clean_start=not persistent,
        keep_alive=settings.keepalive_s,
        session_expiry_interval=settings.session_expiry_s if persistent else 0,
        receive_max=min(settings.receive_maximum, 65535),
    )


async def connect(
    settings: MqttSettings,
    client_id: str | None = None,
    *,
    persistent: bool = True,
    timeout: float | None = None,
) -> MqttConnection:
    """Connect and check the CONNACK's properties against what intake needs (`follow_connack`);
    within `timeout`, `mqtt.connect_timeout_s` by default."""
    host, port = broker_address(settings)
    packet = connect_packet(settings, client_id, persistent=persistent)
    connection, connack = await open_connection(
        host, port, packet, tls_context(settings), timeout or settings.connect_timeout_s
    )
    try:
        follow_connack(settings, connack)
    except Refused:
        connection.abort()
        raise
    return connection


def follow_connack(settings: MqttSettings, connack: mqtt5.ConnAckPacket) -> None:
    """What the broker announced in CONNACK (MQTT 5 §3.2.2.3) that decides whether intake can
    work at all: a refusal (exit 2) when it cannot, a warning when the session is shorter.

    The rest is followed where it is used: Server Keep Alive by the connection; Receive
    Maximum, Topic Alias Maximum, Maximum Packet Size and Retain Available bound what a
    client *sends*, and intake sends only SUBSCRIBE, PUBACK, PINGREQ and DISCONNECT (no
    PUBLISH, no topic alias), each far below any broker's smallest Maximum Packet Size."""
    if connack.max_qos == mqtt5.QoS.AT_MOST_ONCE:
        raise SubscriptionRefused("the broker allows QoS 0 only (CONNACK Maximum QoS): no at-least-once")
    if settings.shared_group and not connack.shared_subscription_available:
        raise SubscriptionRefused(
            "the broker has no shared subscriptions (CONNACK): leave mqtt.shared_group empty"
        )
    wildcards = [topic for topic in settings.topics if "+" in topic or "#" in topic]
    if wildcards and not connack.wildcard_subscription_available:
        raise SubscriptionRefused(
            f"the broker has no wildcard subscriptions (CONNACK), needed by {wildcards}"
        )
    granted = connack.session_expiry_interval
    if granted is not None and granted < settings.session_expiry_s:
        log.warning("mqtt.session_expiry_shortened", requested_s=settings.session_expiry_s, granted_s=granted)


def broker_address(settings: MqttSettings) -> tuple[str, int]:
    url = urlparse(settings.url)
    return url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883)


def not_mqtt5(settings: MqttSettings, exc: MqttError) -> Refused:
    host, port = broker_address(settings)
    return Refused(
        f"the broker at {host}:{port} does not answer MQTT 5 ({exc}): an MQTT 3.1.1-only broker? "
        "The worker speaks MQTT 5 only (docs/brokers.md)"
    )


def subscribed(settings: MqttSettings, mapped: Iterable[str]) -> MqttSettings:
    """`mqtt.topics` and the topic filters of the enabled mappings, each once."""
    topics = list(dict.fromkeys([*settings.topics, *mapped]))
    return settings if topics == settings.topics else dataclasses.replace(settings, topics=topics)


def subscription_filters(settings: MqttSettings) -> list[str]:
    if settings.shared_group:
        return [f"$share/{settings.shared_group}/{topic}" for topic in settings.topics]
    return list(settings.topics)


class MqttIntake(Actor):
    """Reads the broker into the decoder's mailbox; acknowledges what the writer committed."""

    name = "intake"

    def __init__(self, settings: MqttSettings, mailbox: Mailbox[RawMessage], metrics: Metrics):
        self._settings = settings
        self._mailbox = mailbox
        self._metrics = metrics
        self._connection: MqttConnection | None = None
        self._generation = 0
        self._handing = 0  # messages of the batch being put into the mailbox, not put yet
        self._stop_reading = asyncio.Event()
        self._close = asyncio.Event()
        self._reading_stopped = asyncio.Event()
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        backoff = Backoff(self._settings.reconnect_min_s, self._settings.reconnect_max_s)
        failures = unanswered = 0
        while not self._close.is_set():
            generation = self._generation
            try:
                await self._session()
                return
            except MqttError as exc:
                self.subscribed.clear()
                if self._stop_reading.is_set():
                    return  # shutting down; unacknowledged messages stay with the broker
                if isinstance(exc, ConnectRefused) and exc.code in REFUSING_CONNACKS:
                    raise Refused(f"the MQTT broker refused the connection: {exc}") from exc
                older = isinstance(exc, OlderProtocol) or (
                    isinstance(exc, ConnectRefused) and exc.code == UNSUPPORTED_PROTOCOL_VERSION
                )
                # Silence or a close after CONNECT is an outage too, but never from a broker that
                # has answered this process in MQTT 5 (generation 0: none has).
                unanswered = unanswered + 1 if isinstance(exc, NoMqtt5Answer) else 0
                if older or (self._generation == 0 and unanswered >= NO_MQTT5_ANSWER_TRIES):
                    raise not_mqtt5(self._settings, exc) from exc
                # A session that connected resets the backoff; failing to connect extends it.
                failures = 1 if self._generation != generation else failures + 1
                delay = backoff.delay(failures)
                log.warning("mqtt.disconnected", error=str(exc), retry_in_s=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._close.wait()
            finally:
                self._reading_stopped.set()

    async def _session(self) -> None:
        connection = await connect(self._settings)
        try:
            self._generation += 1  # acks of the last connection's messages are skipped from now on
            self._metrics.inc("mqtt_connects")
            self._connection = connection
            self._reading_stopped.clear()
            # Read from the CONNACK on: a resumed session's waiting messages, up to Receive
            # Maximum of them, come before the SUBACK, which is parsed only once they are taken.
            reading = asyncio.create_task(
                read_until_stopped(self._read(connection, self._generation), self._stop_reading)
            )
            try:
                await self._subscribe(connection)
                await reading
            finally:
                await cancel_and_wait(reading)  # what ended it is raised above, or by the SUBSCRIBE
            self._reading_stopped.set()
            # Stay connected while the pipeline drains, so its acknowledgements reach the broker.
            await self._close.wait()
        finally:
            self._connection = None
            await connection.close()

    async def _subscribe(self, connection: MqttConnection) -> None:
        filters = subscription_filters(self._settings)
        codes = await connection.subscribe(filters, qos=1)
        refused = {
            topic: reason_name(mqtt5.SubAckReasonCode, code)
            for topic, code in zip(filters, codes, strict=False)
            if code >= 0x80
        }
        if refused:  # an ACL or a bad filter: idling "ready" on a dead subscription helps nobody
            log.error("mqtt.subscribe_refused", refused=refused)
            raise SubscriptionRefused(f"the broker refused {refused}")
        log.info("mqtt.subscribed", url=redact_url(self._settings.url), topics=filters)
        self.subscribed.set()

    async def _read(self, connection: MqttConnection, generation: int) -> None:
        put_some = self._mailbox.put_some
        counters = self._metrics.counters
        while True:
            batch = await connection.take()
            received_at = time.time()
            # One list and a mailbox call per socket read (more only while the mailbox is
            # full): an `await put` per message cost several per cent of the worker's CPU.
            messages = [
                RawMessage(p.topic, p.payload, received_at, AckToken(generation, p.packet_id or 0))
                for p in batch
            ]
            self._handing = len(messages)
            while messages:
                put = await put_some(messages)
                messages = messages[put:] if put < len(messages) else []
                self._handing -= put
                counters["messages_received"] += put

    def ack(self, tokens: Iterable[AckToken]) -> int:
        """PUBACK the given messages in one write; tokens from an earlier connection are skipped
        (the broker sends those again on the new one)."""
        connection = self._connection
        if connection is None:
            return 0
        generation = self._generation
        return connection.acknowledge([t.mid for t in tokens if t.mid and t.generation == generation])

    @property
    def unacknowledged(self) -> int:
        """QoS 1 messages of this connection received and not yet acknowledged (≤ Receive Maximum)."""
        connection = self._connection
        return connection.in_flight if connection is not None else 0

    @property
    def buffered(self) -> int:
        """Messages received that intake has not put into the mailbox yet (≤ Receive Maximum)."""
        connection = self._connection
        return (connection.buffered if connection is not None else 0) + self._handing

    @property
    def connected(self) -> bool:
        return self._connection is not None and self.subscribed.is_set()

    async def stop(self) -> None:
        self._stop_reading.set()
        if self._connection is not None:
            await self._reading_stopped.wait()

    async def close(self) -> None:
        self._stop_reading.set()
        self._close.set()
