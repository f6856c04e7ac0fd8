"""The ceiling for `iotflow bench`: the leanest QoS 1 subscriber this machine allows.

Bare asyncio streams and the `mqtt5` sans-IO codec (Rust), MQTT 5 like the worker,
with the worker's Receive Maximum: it parses each payload (orjson, and the F2 frame's
hex) and acknowledges each chunk read from the socket with one write of all its
PUBACKs. No callbacks, futures or locks per message, no storage: what a Python
subscriber on this machine costs at the least, so the worker's rate and CPU can be
read against it.

Run as `python -m worker.tools.bench.ceiling URL COUNT [TIMEOUT] [RECEIVE_MAXIMUM]`:
prints `ready` once subscribed, then one JSON line once COUNT messages arrived (or on
timeout): how many, and `last`, the monotonic time of the last one (the bench
measures from its own start signal, the same clock for every process on Linux). It
exits when its stdin ends, so the bench can read its CPU time and peak RSS in /proc first.
"""

from __future__ import annotations

import asyncio
import binascii
import struct
import sys
import time
from urllib.parse import urlparse

import mqtt5
import orjson

from worker.config import SPEC_TOPICS

READ_SIZE = 256 * 1024
_PUBACK = struct.Struct(">BBH")  # fixed header 0x40, remaining length 2, packet id (reason 0 implied)


async def _read_packet(reader: asyncio.StreamReader, buffer: bytearray) -> mqtt5.Packet:
    """The next whole packet during the handshake (buffer keeps what follows it)."""
    while True:
        try:
            with memoryview(buffer) as view:
                packet, size = mqtt5.read(view)
        except IndexError:  # not a whole packet yet
            data = await reader.read(READ_SIZE)
            if not data:
                raise ConnectionError("the broker closed the connection") from None
            buffer += data
            continue
        del buffer[:size]
        return packet


async def ceiling(url: str, count: int, timeout: float, receive_maximum: int = 5000) -> dict[str, float]:
    parsed = urlparse(url)
    reader, writer = await asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 1883)
    connect = mqtt5.ConnectPacket(
        f"iotflow-ceiling-{time.time_ns()}", clean_start=True, keep_alive=60, receive_max=receive_maximum
    )
    writer.write(connect.write())
    buffer = bytearray()
    connack = await _read_packet(reader, buffer)
    if not isinstance(connack, mqtt5.ConnAckPacket) or connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
        raise RuntimeError(f"broker refused the connection: {connack!r}")
    filters = [mqtt5.TopicFilter(topic, max_qos=mqtt5.QoS.AT_LEAST_ONCE) for topic in SPEC_TOPICS]
    writer.write(mqtt5.SubscribePacket(1, filters).write())
    suback = await _read_packet(reader, buffer)
    granted = mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE
    if not isinstance(suback, mqtt5.SubAckPacket) or any(code != granted for code in suback.reason_codes):
        raise RuntimeError(f"broker refused the subscription: {suback!r}")
    print("ready", flush=True)

    received = 0
    last = 0.0
    read, loads, unhexlify, pack = mqtt5.read, orjson.loads, binascii.unhexlify, _PUBACK.pack

    async def consume() -> None:
        nonlocal received, last, buffer
        while received < count:
            data = await reader.read(READ_SIZE)
            if not data:
                raise ConnectionError("the broker closed the connection")
            buffer += data
            acks = []
            offset = 0
            with memoryview(buffer) as view:
                while True:
                    try:
                        packet, size = read(view[offset:])
                    except IndexError:  # the rest of a packet is still on its way
                        break
                    offset += size
                    if isinstance(packet, mqtt5.PublishPacket):
                        document = loads(packet.payload)
                        if isinstance(document, dict) and "data" in document:
                            unhexlify(document["data"])
                        if packet.packet_id is not None:
                            acks.append(pack(0x40, 2, packet.packet_id))
                        received += 1
            del buffer[:offset]
            if acks:
                writer.write(b"".join(acks))
        last = time.monotonic()

    try:
        async with asyncio.timeout(timeout):
            await consume()
    except TimeoutError:
        last = time.monotonic()
    writer.write(mqtt5.DisconnectPacket().write())
    await writer.drain()
    writer.close()
    return {"received": received, "last": last}


def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 300.0
    receive_maximum = int(sys.argv[4]) if len(sys.argv) > 4 else 5000
    try:
        import uvloop  # as the worker runs
    except ImportError:
        result = asyncio.run(ceiling(url, count, timeout, receive_maximum))
    else:
        result = uvloop.run(ceiling(url, count, timeout, receive_maximum))
    print(orjson.dumps(result).decode(), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
