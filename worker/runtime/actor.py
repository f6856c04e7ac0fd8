"""Actors: asyncio tasks that own their state and talk to others only through mailboxes."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

from worker.runtime.mailbox import Mailbox

T = TypeVar("T")


class Actor(ABC):
    """A unit the supervisor starts, watches, stops and closes.

    `stop` finishes the work already received and returns when the actor's task has
    ended; `close` releases connections afterwards. The supervisor stops actors
    upstream first and closes them downstream first, so nothing is left half done.
    """

    name: str = "actor"

    @abstractmethod
    async def run(self) -> None:
        """Run until stopped. Returning early or raising counts as a crash."""

    async def stop(self) -> None:
        """Finish the received work; return once `run` has returned."""

    async def close(self) -> None:
        """Release connections. Called after every actor has stopped, or after a crash."""


class MailboxActor(Actor, Generic[T]):
    """An actor that takes batches from its mailbox until told to stop and drained."""

    batch_max: int = 1000
    idle_timeout: float = 0.1

    def __init__(self, mailbox: Mailbox[T]) -> None:
        self.mailbox = mailbox
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()

    async def run(self) -> None:
        try:
            await self.prepare()
            while True:
                items = await self.mailbox.get_batch(self.batch_max, self.next_timeout())
                if items:
                    await self.handle(items)
                await self.tick()
                if self._stopping.is_set() and self.mailbox.empty():
                    await self.drained()
                    return
        finally:
            self._finished.set()

    async def stop(self) -> None:
        self._stopping.set()
        await self._finished.wait()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def next_timeout(self) -> float:
        """How long to wait for mail before `tick` runs; short while stopping."""
        return 0.0 if self._stopping.is_set() else self.idle_timeout

    async def prepare(self) -> None:
        """Called once when the actor starts, before it takes any mail (which waits meanwhile)."""

    @abstractmethod
    async def handle(self, items: list[T]) -> None:
        """Process one batch of mail."""

    async def tick(self) -> None:
        """Called after every wait, with or without mail (timers, time-based flushes)."""

    async def drained(self) -> None:
        """Called once when stopping and the mailbox is empty (final flush)."""
