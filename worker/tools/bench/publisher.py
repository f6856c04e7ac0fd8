"""The bench's load generator: simulator messages over a minimal MQTT 3.1.1 QoS 1 publisher.

paho's publish costs ~80 µs a message once its network thread contends for the
GIL, so one simulator process tops out near 3-4k msg/s: too slow to load a
worker that should do 10k. This publisher frames PUBLISH packets itself and
writes them in batches, with a window of unacknowledged packet ids, and counts
PUBACKs so a run knows the broker took every message.

Run as `python -m worker.tools.bench.publisher URL COUNT DEVICES FIRST_DEVICE [RATE [FORM]]`
(RATE in messages/s; absent or 0: as fast as the broker takes them; FORM `climate`, the
default, or a JSON form of worker.tools.bench.mappings). It connects,
prints `ready`, and starts when a line arrives on stdin, so the bench starts its clock
for all publishers at once and counts neither their start-up nor their connecting. A
flood (no RATE) builds its messages before `ready`, so the publisher spends its time on
the wire only; a paced run builds each as it goes, with a timestamp of when it is sent
(publish→commit latency is measured from it). The result line gives the publisher's own
send rate, from the start to its last PUBACK, so a reader sees who limited a run.
"""

from __future__ import annotations

import asyncio
import struct
import sys
import time
from urllib.parse import urlparse

import orjson

from worker.decode.codecs import load_codecs
from worker.tools.simulate import build_fleet, message_stream

WINDOW = 10_000  # unacknowledged messages allowed in flight
CHUNK = 200  # messages per socket write


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _remaining_length(len(body)) + body


def _string(text: bytes) -> bytes:
    return struct.pack(">H", len(text)) + text


def connect_packet(client_id: str) -> bytes:
    # protocol name, level 4 (3.1.1), flags: clean session, keepalive 60 s
    return _packet(
        0x10, _string(b"MQTT") + bytes([4, 0x02]) + struct.pack(">H", 60) + _string(client_id.encode())
    )


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    return _packet(0x32, _string(topic.encode()) + struct.pack(">H", packet_id) + payload)


async def publish(
    url: str, count: int, devices: int, first: int, rate: float = 0.0, form: str = "climate"
) -> dict[str, float]:
    parsed = urlparse(url)
    reader, writer = await asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 1883)
    writer.write(connect_packet(f"iotflow-bench-pub-{first}-{time.time_ns()}"))
    connack = await reader.readexactly(4)
    if connack[0] != 0x20 or connack[3] != 0:
        raise RuntimeError(f"broker refused the connection: {connack!r}")
    if form == "climate":
        stream = message_stream(build_fleet(devices, "climate", first=first), load_codecs(), "climate")
    else:
        from worker.tools.bench.mappings import form_stream

        stream = form_stream(form, devices, first)
    if rate <= 0:  # a flood: everything built beforehand
        stream = iter([next(stream) for _ in range(count)])
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    acked = 0
    window = asyncio.Semaphore(WINDOW)

    async def read_acks() -> None:
        nonlocal acked
        while acked < count:
            head = await reader.readexactly(2)
            body = await reader.readexactly(head[1])  # PUBACK: remaining length 2
            if head[0] >> 4 == 4:
                acked += 1
                window.release()
            del body

    acks = asyncio.create_task(read_acks())
    started = time.monotonic()
    sent = 0
    packet_id = 0
    while sent < count:
        batch = []
        for _ in range(min(CHUNK, count - sent)):
            await window.acquire()
            packet_id = packet_id % 65535 + 1
            topic, payload = next(stream)
            batch.append(publish_packet(topic, payload, packet_id))
        writer.write(b"".join(batch))
        await writer.drain()
        sent += len(batch)
        if rate > 0:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
    await acks
    elapsed = time.monotonic() - started
    writer.write(b"\xe0\x00")  # DISCONNECT
    await writer.drain()
    writer.close()
    return {"sent": sent, "acked": acked, "seconds": elapsed, "rate": sent / elapsed, "started": started}


def main() -> None:
    url, count, devices, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rate = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    form = sys.argv[6] if len(sys.argv) > 6 else "climate"
    print(orjson.dumps(asyncio.run(publish(url, count, devices, first, rate, form))).decode(), flush=True)


if __name__ == "__main__":
    main()
