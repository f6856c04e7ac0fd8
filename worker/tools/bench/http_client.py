"""The HTTP bench's load generator: JSON telemetry over keep-alive connections, raw asyncio streams.

Run as `python -m worker.tools.bench.http_client PORT CONNECTIONS REQUESTS BATCH RATE` with
the device keys of its slice of the fleet on stdin, one a line, then an empty line. It
opens every connection, posts one unmeasured request per device (the daemon meets its
fleet, as a long-running one has), prints `ready`, and starts on the next stdin line, so
the bench starts one clock for all clients. Each request is `BATCH` timed entries of one
`temperature` value, `ts` unique per device, so every reading is a row of its own.

RATE (requests/s, 0 = as fast as answered) paces the requests on a schedule; a request's
latency counts from its scheduled time, so a client that falls behind reports the wait
too. The result line: requests sent, answers by status, readings accepted in 200s, the
latencies (ms, paced runs only) and when the last answer came (monotonic clock).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import Counter

import orjson


class Slice:
    """The bodies: per device a sequence number, each reading 1 ms after the one before."""

    def __init__(self, keys: list[str], batch: int, requests: int) -> None:
        self.keys = keys
        self.batch = batch
        span_ms = (requests // max(len(keys), 1) + 2) * batch
        self.base_ms = int(time.time() * 1000) - span_ms - 60_000  # all in the recent past

    def request(self, port: int, index: int) -> bytes:
        key = self.keys[index % len(self.keys)]
        seq = index // len(self.keys)
        first = self.base_ms + (seq + 1) * self.batch
        entries = [
            {"ts": first + j, "values": {"temperature": 20.0 + (first + j) % 97 / 10}}
            for j in range(self.batch)
        ]
        return _post(port, key, orjson.dumps(entries if self.batch > 1 else entries[0]))

    def warm_up(self, port: int, number: int) -> bytes:
        """Device `number`'s warm-up request: a timestamp before every measured one's."""
        body = orjson.dumps({"ts": self.base_ms - 1000, "values": {"temperature": 20.0}})
        return _post(port, self.keys[number], body)


def _post(port: int, key: str, body: bytes) -> bytes:
    head = (
        f"POST /api/v1/telemetry HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:")
    )
    return status, await reader.readexactly(length)


async def run(port: int, connections: int, requests: int, batch: int, rate: float) -> dict[str, object]:
    keys = [line.strip() for line in iter(sys.stdin.readline, "\n") if line.strip()]
    work = Slice(keys, batch, requests)
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    for number in range(len(keys)):  # the warm-up: one request per device, not counted
        reader, writer = streams[number % connections]
        writer.write(work.warm_up(port, number))
        status, _ = await _answer(reader)
        if status != 200:
            raise RuntimeError(f"the warm-up request was answered {status}")
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    started = time.monotonic()
    statuses: Counter[int] = Counter()
    accepted = 0
    latencies: list[float] = []
    counter = itertools.count()
    last = started

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted, last
        while (index := next(counter)) < requests:
            scheduled = started + index / rate if rate > 0 else time.monotonic()
            if rate > 0 and (ahead := scheduled - time.monotonic()) > 0:
                await asyncio.sleep(ahead)
            writer.write(work.request(port, index))
            status, body = await _answer(reader)
            last = time.monotonic()
            statuses[status] += 1
            if status == 200:
                accepted += orjson.loads(body)["accepted"]
            if rate > 0:
                latencies.append(round((last - scheduled) * 1000, 2))
        writer.close()

    await asyncio.gather(*(connection(*stream) for stream in streams))
    return {
        "sent": requests,
        "statuses": {str(code): n for code, n in statuses.items()},
        "accepted": accepted,
        "latencies_ms": latencies,
        "started": started,
        "last": last,
    }


def main() -> None:
    port, connections, requests, batch = (int(arg) for arg in sys.argv[1:5])
    rate = float(sys.argv[5])
    print(orjson.dumps(asyncio.run(run(port, connections, requests, batch, rate))).decode(), flush=True)


if __name__ == "__main__":
    main()
