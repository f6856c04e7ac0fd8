"""MQTT intake: QoS 1, a persistent MQTT 5 session, and acknowledgement only after storage.

aiomqtt acknowledges on receipt; we switch its paho client to manual
acknowledgement and send PUBACK when the writer says the batch is committed.
Flow control comes from MQTT 5's Receive Maximum: the broker never has more than
`receive_maximum` unacknowledged messages out to us, so when storage stalls the
broker holds the rest and this process's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Iterable, Sequence
from urllib.parse import unquote, urlparse

import aiomqtt
import paho.mqtt._packet
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from schemas.records import AckToken, RawMessage
from worker.config import MqttSettings
from worker.intake import read_until_stopped
from worker.metrics import Metrics
from worker.retry import Backoff, Refused
from worker.runtime.actor import Actor
from worker.runtime.mailbox import Mailbox

log = structlog.get_logger("worker.intake")


class SubscriptionRefused(Refused):
    """The broker refused a topic filter (SUBACK failure): a setting or an ACL to fix."""


# CONNACK codes that are a configuration problem, not an outage: MQTT 5 bad user name or
# password (134), not authorized (135), banned (138), bad authentication method (140);
# MQTT 3.1.1 bad user name or password (4), not authorized (5).
REFUSING_CONNACKS = {134, 135, 138, 140, 4, 5}


class _SharedTableProperties(Properties):
    """paho's Properties builds its (read-only) name and type tables for every packet it
    decodes: ~15% of intake CPU at 5k msg/s. This subclass shares one copy of them."""

    _tables = Properties(PacketTypes.PUBLISH).__dict__

    def __init__(self, packetType: int) -> None:
        self.packetType = packetType
        self.types = self._tables["types"]
        self.names = self._tables["names"]
        self.properties = self._tables["properties"]


# Only the packet decoder (PUBLISH and the acks it reads) uses this name; see tests/test_intake.py.
paho.mqtt._packet.Properties = _SharedTableProperties  # type: ignore[misc]


def build_client(settings: MqttSettings, client_id: str | None = None) -> aiomqtt.Client:
    """An aiomqtt client for `settings.url` speaking MQTT 5 with a persistent session."""
    url = urlparse(settings.url)
    tls_params = None
    if url.scheme == "mqtts":
        tls_params = aiomqtt.TLSParameters(
            ca_certs=settings.ca_file or None,
            certfile=settings.cert_file or None,
            keyfile=settings.key_file or None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = settings.session_expiry_s
    properties.ReceiveMaximum = min(settings.receive_maximum, 65535)
    return aiomqtt.Client(
        hostname=url.hostname or "127.0.0.1",
        port=url.port or (8883 if url.scheme == "mqtts" else 1883),
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None,
        identifier=client_id or settings.client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        keepalive=settings.keepalive_s,
        tls_params=tls_params,
        properties=properties,
        timeout=10,
    )


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
        self._client: aiomqtt.Client | None = None
        self._generation = 0
        self._unacknowledged = 0
        self._stop_reading = asyncio.Event()
        self._close = asyncio.Event()
        self._reading_stopped = asyncio.Event()
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        backoff = Backoff(self._settings.reconnect_min_s, self._settings.reconnect_max_s)
        failures = 0
        while not self._close.is_set():
            generation = self._generation
            try:
                await self._session()
                return
            except aiomqtt.MqttError as exc:
                self._client = None
                self.subscribed.clear()
                if self._stop_reading.is_set():
                    return  # shutting down; unacknowledged messages stay with the broker
                if _connack_code(exc) in REFUSING_CONNACKS:
                    raise Refused(f"the MQTT broker refused the connection: {exc}") from exc
                # A session that connected resets the backoff; failing to connect extends it.
                failures = 1 if self._generation != generation else failures + 1
                delay = backoff.delay(failures)
                log.warning("mqtt.disconnected", error=str(exc), retry_in_s=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._close.wait(), delay)
            finally:
                self._reading_stopped.set()

    async def _session(self) -> None:
        client = build_client(self._settings)
        client._client.manual_ack_set(True)  # paho: PUBACK only when we call ack()
        async with client:
            self._generation += 1
            self._unacknowledged = 0  # the broker redelivers the last session's on its own
            self._metrics.inc("mqtt_connects")
            self._client = client
            self._reading_stopped.clear()
            filters = subscription_filters(self._settings)
            granted: Sequence[int | ReasonCode] = await client.subscribe([(topic, 1) for topic in filters])
            refused = {
                topic: str(code) for topic, code in zip(filters, granted, strict=False) if _is_failure(code)
            }
            if refused:  # an ACL or a bad filter: idling "ready" on a dead subscription helps nobody
                log.error("mqtt.subscribe_refused", refused=refused)
                raise SubscriptionRefused(f"the broker refused {refused}")
            log.info("mqtt.subscribed", url=_redact(self._settings.url), topics=filters)
            self.subscribed.set()
            await read_until_stopped(self._read(client, self._generation), self._stop_reading)
            self._reading_stopped.set()
            # Stay connected while the pipeline drains, so its acknowledgements reach the broker.
            await self._close.wait()
            self._client = None

    async def _read(self, client: aiomqtt.Client, generation: int) -> None:
        mailbox = self._mailbox
        metrics = self._metrics
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes):
                payload = str(payload).encode() if payload is not None else b""
            await mailbox.put(
                RawMessage(
                    topic=message.topic.value,
                    payload=payload,
                    received_at=time.time(),
                    ack=AckToken(generation, message.mid if message.qos else 0),
                )
            )
            metrics.counters["messages_received"] += 1
            if message.qos:
                self._unacknowledged += 1

    def ack(self, tokens: Iterable[AckToken]) -> int:
        """PUBACK the given messages; tokens from an earlier connection are skipped (redelivered)."""
        client = self._client
        if client is None:
            return 0
        paho = client._client
        generation = self._generation
        sent = 0
        for token in tokens:
            if token.mid and token.generation == generation:
                paho.ack(token.mid, 1)
                sent += 1
        self._unacknowledged -= sent
        return sent

    @property
    def unacknowledged(self) -> int:
        """Messages of this session received and not yet acknowledged (≤ Receive Maximum)."""
        return self._unacknowledged

    @property
    def buffered(self) -> int:
        """Messages aiomqtt received that intake has not taken yet (bounded by Receive Maximum)."""
        client = self._client
        return client._queue.qsize() if client is not None else 0

    @property
    def connected(self) -> bool:
        return self._client is not None and self.subscribed.is_set()

    async def stop(self) -> None:
        self._stop_reading.set()
        if self._client is not None:
            await self._reading_stopped.wait()

    async def close(self) -> None:
        self._stop_reading.set()
        self._close.set()


def _connack_code(exc: aiomqtt.MqttError) -> int | None:
    if not isinstance(exc, MqttConnectError):
        return None
    rc = exc.rc
    return rc.value if isinstance(rc, ReasonCode) else rc


def _is_failure(code: int | ReasonCode) -> bool:
    return code.is_failure if isinstance(code, ReasonCode) else code >= 0x80


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url
