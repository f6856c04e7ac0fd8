"""A minimal MQTT 5 subscriber connection on the `mqtt5` codec: what at-least-once intake needs.

The `mqtt5` package (Rust, sans-IO) frames and parses packets; this module is the
asyncio Protocol around it and nothing more: CONNECT/CONNACK, one SUBSCRIBE,
PUBLISH in, PUBACK out, PINGREQ, DISCONNECT. No maintained client let us defer
acknowledgements without paying per message for a lock, a future, a callback or a
property table (docs/performance.md, "Intake client"), so the per-message path is:

* `data_received` parses every whole packet of a read and appends each PUBLISH to
  `inbox`, waking the one reader at most once per read;
* the reader takes the whole inbox in one call (`take`);
* `acknowledge` writes the PUBACKs of a committed batch in one transport write.

Flow control: we announce Receive Maximum in CONNECT, so the broker should have at most
that many QoS 1 messages unacknowledged out to us (MQTT 5 §4.9). Mosquitto 2.0 does not
keep to it after the first PUBACK, and QoS 0 is outside it anyway, so the bound is kept
here: parsing stops and reading pauses while `in_flight` (QoS 1 parsed and not yet
acknowledged) or the inbox reaches Receive Maximum, and TCP holds the rest in the broker.

Keepalive: a PINGREQ every three quarters of `keepalive` seconds (HiveMQ allows 1.5 times
the keepalive rounded down to whole seconds: 1 s for a keepalive of 1, so a PINGREQ on the
second itself comes too late); if nothing at all has arrived from the broker by the next
one, the connection is declared dead (unless we paused reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from collections.abc import Sequence
from typing import cast

import mqtt5
from mqtt5 import ConnAckPacket, PublishPacket, SubAckPacket

PINGREQ = mqtt5.PingReqPacket().write()
DISCONNECT = mqtt5.DisconnectPacket().write()


def reason_name(codes: type[enum.IntEnum], code: int) -> str:
    """`not authorized` for 135 and the like; the number alone for a code the codec does not name."""
    try:
        return codes(code).name.lower().replace("_", " ")
    except ValueError:
        return str(code)


class MqttError(Exception):
    """The connection failed or was lost: an outage, retried with backoff."""


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a failure reason code (MQTT 5 §3.2.2.2)."""

    def __init__(self, code: int, reason: str | None) -> None:
        name = reason_name(mqtt5.ConnAckReasonCode, code)
        super().__init__(f"CONNACK {code} ({name}){f': {reason}' if reason else ''}")
        self.code = code


class NoMqtt5Answer(MqttError):
    """TCP (and TLS) connected, but no MQTT 5 CONNACK came back: the broker closed the
    connection, stayed silent, or answered in another protocol version. Once in a while an
    outage; every time, a broker that does not speak MQTT 5."""


class OlderProtocol(NoMqtt5Answer):
    """The broker answered CONNECT with an MQTT 3.1/3.1.1 CONNACK (two bytes long, where an
    MQTT 5 one has at least three): it does not speak MQTT 5."""

    def __init__(self, return_code: int) -> None:
        name = V3_RETURN_CODES.get(return_code, "unknown")
        super().__init__(f"an MQTT 3.1.1 CONNACK, return code {return_code} ({name})")
        self.return_code = return_code


# MQTT 3.1.1 §3.2.2.3: what a pre-5 broker answers; 1 is its answer to protocol level 5.
V3_RETURN_CODES = {
    0: "accepted",
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
# CONNACK's first bytes from an MQTT 3.1/3.1.1 broker: type 2, remaining length 2.
V3_CONNACK = b"\x20\x02"


class MqttConnection(asyncio.Protocol):
    """One network connection to the broker. Build it with `open_connection`."""

    def __init__(self, receive_maximum: int) -> None:
        self.receive_maximum = receive_maximum
        self.inbox: list[PublishPacket] = []  # received, not yet taken by the reader
        self.in_flight = 0  # QoS 1 messages received on this connection and not yet acknowledged
        self.peak_in_flight = 0
        self.error: MqttError | None = None  # set once the connection is lost
        self._transport: asyncio.Transport | None = None
        self._unparsed = b""  # received, not parsed yet: a packet's start, or bytes past the bound
        self._reader: asyncio.Future[None] | None = None  # the reader waiting in `take`
        self._replies: dict[type, asyncio.Future[object]] = {}  # CONNACK / SUBACK awaited
        self._lost = asyncio.get_running_loop().create_future()
        self._paused = False
        self._closing = False
        self._heard = True  # anything arrived since the last PINGREQ
        self._keepalive: asyncio.TimerHandle | None = None

    # asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        if self._closing:
            return  # we said DISCONNECT: whatever comes now is redelivered next session
        self._unparsed = self._unparsed + data if self._unparsed else data
        self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(MqttError(f"connection lost: {exc}" if exc else "the broker closed the connection"))
        if not self._lost.done():
            self._lost.set_result(None)
        if self._keepalive is not None:
            self._keepalive.cancel()

    # The reader and the writer's acknowledgements ------------------------------------------

    async def take(self) -> list[PublishPacket]:
        """Wait for messages, then take all received so far; MqttError once the connection is lost
        (whatever the inbox still holds is unacknowledged, so the broker sends it again)."""
        while not self.inbox or self.error is not None:
            if self.error is not None:
                raise self.error
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        batch, self.inbox = self.inbox, []
        if self._paused:
            self._resume()
        return batch

    def acknowledge(self, packet_ids: Sequence[int]) -> int:
        """PUBACK the given QoS 1 messages of this connection in one write; how many went out."""
        if self._transport is None or self.error is not None or self._closing or not packet_ids:
            return 0
        puback = mqtt5.PubAckPacket
        self._transport.write(b"".join([puback(mid).write() for mid in packet_ids]))
        self.in_flight -= len(packet_ids)
        if self._paused:
            self._resume()
        return len(packet_ids)

    @property
    def buffered(self) -> int:
        return len(self.inbox)

    # Connection lifetime -----------------------------------------------------------------

    async def connect(self, packet: mqtt5.ConnectPacket) -> ConnAckPacket:
        connack = await self._request(packet, ConnAckPacket)
        assert isinstance(connack, ConnAckPacket)
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            raise ConnectRefused(int(connack.reason_code), connack.reason_str)
        # The broker may impose its own keepalive (MQTT 5 §3.2.2.3.14).
        self._start_keepalive(connack.server_keep_alive or packet.keep_alive)
        return connack

    async def subscribe(self, filters: Sequence[str], qos: int = 1) -> list[int]:
        """SUBSCRIBE once; the reason code of each filter (≥ 0x80 is a refusal)."""
        packet = mqtt5.SubscribePacket(
            1, [mqtt5.TopicFilter(topic, max_qos=mqtt5.QoS(qos)) for topic in filters]
        )
        suback = await self._request(packet, SubAckPacket)
        assert isinstance(suback, SubAckPacket)
        return [int(code) for code in suback.reason_codes]

    async def close(self, timeout: float = 5.0) -> None:
        """DISCONNECT (normal: the session stays for `session_expiry_s`), after any queued acks.

        Closing a socket with unread bytes in it sends RST, and a RST makes the broker drop
        what it had not read yet, our last PUBACKs included. So after DISCONNECT we read on,
        discarding, until the broker closes its side, and abort only if it does not in time."""
        transport = self._transport
        if transport is not None and not transport.is_closing() and not self._lost.done():
            self._closing = True
            transport.write(DISCONNECT)
            self._paused = False
            transport.resume_reading()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._lost)
        finally:  # cancelled or timed out: do not leave the socket behind
            if not self._lost.done() and transport is not None:
                transport.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # Internals ---------------------------------------------------------------------------

    def _parse(self) -> None:
        """Parse the whole packets received, stopping at the in-process bound (then pausing reads)."""
        data = self._unparsed
        view = memoryview(data)
        offset, end = 0, len(data)
        inbox, bound = self.inbox, self.receive_maximum
        in_flight = self.in_flight
        before = len(inbox)
        if ConnAckPacket in self._replies and data[:2] == V3_CONNACK and end >= 4:
            self._fail(OlderProtocol(data[3]))
            self.abort()
            return
        while offset < end and in_flight < bound and len(inbox) < bound:
            try:
                packet, size = mqtt5.read(view[offset:])
            except IndexError:  # the codec's "not enough bytes": the rest comes with the next read
                break
            except ValueError as exc:
                self._fail(MqttError(f"malformed packet from the broker: {exc}"))
                self.abort()
                return
            offset += size
            if type(packet) is PublishPacket:
                inbox.append(packet)
                if packet.packet_id is not None:  # QoS 1 (we subscribe at most 1): counts to the bound
                    in_flight += 1
            else:
                self._control(packet)
        view.release()
        self._unparsed = data[offset:] if offset < end else b""
        self.in_flight = in_flight
        self.peak_in_flight = max(self.peak_in_flight, in_flight)
        if (in_flight >= bound or len(inbox) >= bound) and not self._paused and self._transport is not None:
            # Mosquitto 2.0 sends past our Receive Maximum after the first PUBACK (docs/performance.md),
            # and QoS 0 is outside it anyway: stop reading, so TCP holds the rest in the broker.
            self._paused = True
            self._transport.pause_reading()
        if len(inbox) > before and self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _resume(self) -> None:
        """Read again once below the bound: first what was received but left unparsed."""
        if self.in_flight >= self.receive_maximum or len(self.inbox) >= self.receive_maximum:
            return
        self._paused = False
        if self._unparsed:
            self._parse()
        if not self._paused and self._transport is not None and self.error is None:
            self._transport.resume_reading()

    def _control(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.PingRespPacket):
            return
        if isinstance(packet, mqtt5.DisconnectPacket):
            reason = packet.reason_code.name.lower().replace("_", " ")
            self._fail(MqttError(f"the broker disconnected us: {reason} {packet.reason_str or ''}".rstrip()))
            self.abort()
            return
        waiter = self._replies.pop(type(packet), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(packet)
        else:
            self._protocol_error(mqtt5.DisconnectReasonCode.PROTOCOL_ERROR, f"unexpected {packet!r}")

    async def _request(self, packet: mqtt5.ConnectPacket | mqtt5.SubscribePacket, reply: type) -> object:
        if self.error is not None:
            raise self.error
        assert self._transport is not None
        waiter: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._replies[reply] = waiter
        self._transport.write(packet.write())
        lost = asyncio.ensure_future(asyncio.shield(self._lost))
        try:
            await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                raise self.error or MqttError("connection lost")
            return waiter.result()
        finally:
            # However this ends (a timeout or a cancel included), the waiter goes with it: a
            # failure set on it later would be an exception nobody retrieves.
            lost.cancel()
            if self._replies.get(reply) is waiter:
                del self._replies[reply]
            if not waiter.done():
                waiter.cancel()
            elif not waiter.cancelled():
                waiter.exception()  # the caller has the error: as the result above or self.error

    def _start_keepalive(self, seconds: int) -> None:
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        interval = seconds * 0.75

        def tick() -> None:
            if self._transport is None or self.error is not None:
                return
            if not self._heard and not self._paused:
                self._fail(MqttError(f"no word from the broker for {seconds} s (keepalive)"))
                self.abort()
                return
            self._heard = False
            self._transport.write(PINGREQ)
            self._keepalive = loop.call_later(interval, tick)

        self._keepalive = loop.call_later(interval, tick)

    def _protocol_error(self, code: mqtt5.DisconnectReasonCode, reason: str) -> None:
        self._fail(MqttError(f"protocol error: {reason}"))
        if self._transport is not None:
            self._transport.write(mqtt5.DisconnectPacket(reason_code=code).write())
            self._transport.close()

    def _fail(self, error: MqttError) -> None:
        if self.error is None:
            self.error = error
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)
        for waiter in self._replies.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._replies.clear()


async def open_connection(
    host: str,
    port: int,
    connect: mqtt5.ConnectPacket,
    tls: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> tuple[MqttConnection, ConnAckPacket]:
    """Connect and exchange CONNECT/CONNACK within `timeout`; if not, MqttError: ConnectRefused
    for a failure CONNACK, NoMqtt5Answer when the broker heard CONNECT but gave no MQTT 5 CONNACK."""
    loop = asyncio.get_running_loop()
    connection: MqttConnection | None = None
    connected = False  # TCP (and TLS) up: from here a failure is the broker's answer, or its silence
    try:
        async with asyncio.timeout(timeout):
            _, connection = await loop.create_connection(
                lambda: MqttConnection(connect.receive_max),
                host,
                port,
                ssl=tls,
                server_hostname=host if tls is not None else None,
            )
            connected = True
            connack = await connection.connect(connect)
            return connection, connack
    except BaseException as exc:
        if connection is not None:
            connection.abort()
        if isinstance(exc, ConnectRefused | NoMqtt5Answer):
            raise
        if connected and isinstance(exc, MqttError):  # it heard CONNECT, then closed or garbled
            raise NoMqtt5Answer(f"{host}:{port}: {exc}, before any CONNACK") from exc
        if connected and isinstance(exc, TimeoutError):
            raise NoMqtt5Answer(f"no CONNACK from {host}:{port} within {timeout} s") from exc
        if isinstance(exc, TimeoutError):
            raise MqttError(f"cannot connect to {host}:{port} within {timeout} s") from exc
        if isinstance(exc, OSError):  # refused, unreachable, TLS handshake (ssl.SSLError)
            raise MqttError(f"cannot connect to {host}:{port}: {exc}") from exc
        raise
