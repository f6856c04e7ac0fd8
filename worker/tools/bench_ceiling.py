"""The raw ceiling for `iotflow bench`: a bare aiomqtt subscriber that only parses.

Run as `python -m worker.tools.bench_ceiling URL COUNT`: prints `ready` once subscribed,
then one JSON line with the receive rate once COUNT messages arrived (or on timeout).
"""

from __future__ import annotations

import asyncio
import binascii
import sys
import time
from urllib.parse import urlparse

import aiomqtt
import orjson

from worker.config import SPEC_TOPICS


async def ceiling(url: str, count: int, timeout: float) -> dict[str, float]:
    parsed = urlparse(url)
    received = 0
    first = last = 0.0
    async with aiomqtt.Client(
        parsed.hostname or "127.0.0.1",
        parsed.port or 1883,
        identifier=f"iotflow-ceiling-{time.time_ns()}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe([(topic, 1) for topic in SPEC_TOPICS])
        print("ready", flush=True)

        async def consume() -> None:
            nonlocal received, first, last
            async for message in client.messages:
                document = orjson.loads(message.payload)
                if isinstance(document, dict) and "data" in document:
                    binascii.unhexlify(document["data"])
                received += 1
                if received == 1:
                    first = time.monotonic()
                if received >= count:
                    break
            last = time.monotonic()

        try:
            await asyncio.wait_for(consume(), timeout)
        except TimeoutError:
            last = time.monotonic()
    elapsed = max(last - first, 1e-9)
    return {"received": received, "seconds": elapsed, "rate": received / elapsed}


def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 300.0
    print(orjson.dumps(asyncio.run(ceiling(url, count, timeout))).decode(), flush=True)


if __name__ == "__main__":
    main()
