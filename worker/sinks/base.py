"""The narrow interface every storage backend implements."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar, runtime_checkable

from schemas.records import DecodedBatch


class Sink(Protocol):
    """A store the pipeline writes each batch to before acknowledging it.

    `write` must be idempotent: after a crash the same messages come again.
    It raises on failure; the writer retries with backoff after calling `reset`.
    A store of readings returns how many of the batch's readings it newly stored (the rest
    were there already: a redelivery); any other store returns None.
    """

    name: str

    async def write(self, batch: DecodedBatch) -> int | None: ...

    async def reset(self) -> None:
        """Drop connections so the next `write` starts afresh."""

    async def close(self) -> None: ...


@runtime_checkable
class Startable(Protocol):
    """A sink with work of its own (a replay, a rebuild): the writer starts it before the
    first batch, and its `close` stops that work."""

    async def start(self) -> None: ...


T = TypeVar("T")


class Abandoned:
    """Writes given up on after a timeout, still unwinding.

    `asyncio.wait_for` waits for the cancelled call to finish, and a driver cancelling a
    query on a server that accepts and never answers may take its own timeout to do so
    (asyncpg: tens of seconds). `within` raises at the deadline instead and keeps the
    cancelled call here, so that `close` can wait for it once."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    async def within(self, call: Awaitable[T], timeout_s: float) -> T:
        task = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
        except asyncio.CancelledError:  # we are stopped: the call goes with us, tracked too
            self._abandon(task)
            raise
        if task in done:
            return task.result()
        self._abandon(task)
        raise TimeoutError(f"no answer within {timeout_s} s")

    def _abandon(self, task: asyncio.Future[Any]) -> None:
        task.cancel()
        self._tasks.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # the store's late error: the outage is reported already

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
