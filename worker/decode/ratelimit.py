"""Per-device rate limiting (`ratelimit:device:{device_id}:{window}`).

At most `limit` messages per device per fixed window, agreed by every worker through
one Redis counter per device and window. Redis is asked once per decoded batch for
all its devices (INCRBY + EXPIRE, pipelined), never once per message. The excess is
not dropped: the decoder dead-letters it with `rate_limited`, so it is stored,
counted and acknowledged like any rejected message.

Rate limits are derivable state: while Redis is away each worker counts on its own
(one warning), and ingest goes on. A message the broker redelivers counts again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog

from worker.retry import is_transient
from worker.stores.keys import RedisKeys

log = structlog.get_logger("worker.decode")


class RateLimiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: RedisKeys,
        limit: int,
        window_s: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._window = -1
        self._local: dict[int, int] = {}  # this window's counts, used while Redis is away
        self._reported: set[int] = set()  # devices already logged as over the limit this window
        self._redis_down = False

    @property
    def enabled(self) -> bool:
        return self._limit > 0

    def describe(self) -> str:
        return f"{self._limit} messages per {self._window_s} s"

    async def admit(self, counts: dict[int, int]) -> dict[int, int]:
        """How many of each device's `counts` messages (in arrival order) fit its limit."""
        window = int(self._clock() // self._window_s)
        if window != self._window:
            self._window, self._local, self._reported = window, {}, set()
        totals = await self._count(window, counts)
        allowed = {}
        for device_id, count in counts.items():
            before = totals[device_id] - count  # what this window had before this batch
            allowed[device_id] = max(0, min(count, self._limit - before))
            if allowed[device_id] < count and device_id not in self._reported:
                self._reported.add(device_id)
                log.warning(
                    "rate_limit.exceeded",
                    device_id=device_id,
                    limit=self._limit,
                    window_s=self._window_s,
                    hint="the rest of this window's messages are dead-lettered as rate_limited",
                )
        return allowed

    async def _count(self, window: int, counts: dict[int, int]) -> dict[int, int]:
        """Each device's count in this window, this batch included."""
        for device_id, count in counts.items():
            self._local[device_id] = self._local.get(device_id, 0) + count
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for device_id, count in counts.items():
                    key = self._keys.rate_limit(device_id, window)
                    pipe.incrby(key, count)
                    pipe.expire(key, self._window_s * 2)
                replies = await pipe.execute()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if not self._redis_down:
                self._redis_down = True
                log.warning("rate_limit.local_only", error=repr(exc), hint="each worker counts alone")
            return {device_id: self._local[device_id] for device_id in counts}
        if self._redis_down:
            self._redis_down = False
            log.info("rate_limit.shared_again")
        return {device_id: int(replies[2 * i]) for i, device_id in enumerate(counts)}
