"""A bounded mailbox that hands items out in batches, to one consumer."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def _wake(waiters: deque[asyncio.Future[None]], count: int = 1) -> None:
    while count and waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            count -= 1


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Mailbox(Generic[T]):
    """A bounded FIFO: `put` waits while it is full, which is how backpressure reaches intake.

    Waits are bare futures with a timer handle rather than `asyncio.wait_for`, which
    creates a task per wait: between two busy stages a consumer waits once per small
    batch, and that task was a measurable share of a stage's CPU.
    """

    def __init__(self, maxsize: int) -> None:
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    async def put(self, item: T) -> None:
        while len(self._items) >= self._maxsize:
            waiter = asyncio.get_running_loop().create_future()
            self._putters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    _wake(self._putters)  # pass the slot we were given to the next putter
                raise
        self._items.append(item)
        _wake(self._getters)

    async def put_some(self, items: list[T]) -> int:
        """Wait for room (in turn with `put`), then put as many of `items`, in order, as
        there is room for; how many. Intake hands on a whole socket read this way, with one
        call and one wake instead of an `await put` per message, and the bound still counts
        items, so memory stays bounded the same way."""
        if not items:
            return 0
        if len(self._items) >= self._maxsize or self._putters:
            await self.put(items[0])  # the one way to wait for room: in turn with other putters
            return 1
        room = self._maxsize - len(self._items)
        self._items.extend(items if room >= len(items) else items[:room])
        _wake(self._getters)
        return min(room, len(items))

    async def get_batch(self, max_items: int, timeout: float | None) -> list[T]:
        """Wait up to `timeout` (None: forever) for one item, then take what else is ready."""
        items = self._items
        if not items:
            if timeout is not None and timeout <= 0:
                return []
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            self._getters.append(waiter)
            timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                with contextlib.suppress(ValueError):  # timed out or cancelled: not woken by a put
                    self._getters.remove(waiter)
            if not items:
                return []
        batch = [items.popleft() for _ in range(min(max_items, len(items)))]
        _wake(self._putters, len(batch))
        return batch

    def __iter__(self) -> Iterator[T]:
        """The waiting items, oldest first, for a gauge that weighs them at scrape time."""
        return iter(self._items)

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    @property
    def maxsize(self) -> int:
        return self._maxsize
