"""The narrow interface every storage backend implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

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
