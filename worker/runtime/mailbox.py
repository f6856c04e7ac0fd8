"""A bounded mailbox that hands items out in batches."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """A bounded FIFO: `put` waits while it is full, which is how backpressure reaches intake."""

    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize)

    async def put(self, item: T) -> None:
        await self._queue.put(item)

    async def get_batch(self, max_items: int, timeout: float | None) -> list[T]:
        """Wait up to `timeout` for one item, then take whatever else is ready, up to `max_items`."""
        queue = self._queue
        if queue.empty():
            if timeout is not None and timeout <= 0:
                return []
            try:
                first = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                return []
        else:
            first = queue.get_nowait()
        items = [first]
        while len(items) < max_items and not queue.empty():
            items.append(queue.get_nowait())
        return items

    def qsize(self) -> int:
        return self._queue.qsize()

    def empty(self) -> bool:
        return self._queue.empty()

    @property
    def maxsize(self) -> int:
        return self._queue.maxsize
