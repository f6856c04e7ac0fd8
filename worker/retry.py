"""Waiting out a store that went away: which errors count, and the retry loop with backoff."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import redis.exceptions
import structlog

log = structlog.get_logger("worker.retry")

T = TypeVar("T")

# Errors that mean "the store is away", worth waiting out; anything else is a bug and crashes.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.InsufficientResourcesError,
    # Class 40: another writer (a second worker) held the rows; the transaction can simply run again.
    asyncpg.exceptions.TransactionRollbackError,
    # A replica promoted during failover answers read-only for a moment.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)

RETRY_MIN_S = 0.2
RETRY_MAX_S = 10.0


async def retry_transient(
    attempt: Callable[[], Awaitable[T]],
    event: str,
    *,
    reset: Callable[[], Awaitable[None]] | None = None,
    on_down: Callable[[BaseException], None] | None = None,
    on_up: Callable[[], None] | None = None,
    **context: Any,
) -> T:
    """Run `attempt` until it succeeds, sleeping with doubling backoff after transient errors.

    One `{event}.unavailable` line when the outage starts and one `{event}.recovered`
    line when it ends, never one per retry. `reset` drops broken connections.
    """
    delay = RETRY_MIN_S
    failing = False
    while True:
        try:
            result = await attempt()
        except TRANSIENT_ERRORS as exc:
            if not failing:
                failing = True
                log.error(f"{event}.unavailable", error=repr(exc), **context)
            if on_down is not None:
                on_down(exc)
            if reset is not None:
                await reset()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        if failing:
            log.info(f"{event}.recovered", **context)
            if on_up is not None:
                on_up()
        return result
