"""cancel_and_wait ends a task even where Python 3.11's asyncio.wait_for loses its cancellation."""

from __future__ import annotations

import asyncio
import sys

import pytest

from worker.runtime import cancel
from worker.runtime.cancel import cancel_and_wait


async def _waits_then_loops(result: asyncio.Future[int], rounds: list[int]) -> None:
    """A loop around wait_for, as redis-py's command sending is inside the rules' listener."""
    while True:
        await asyncio.wait_for(result, 10)
        rounds.append(1)
        await asyncio.sleep(0.001)


async def test_a_cancellation_arriving_with_the_result_still_ends_the_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cancel, "RECANCEL_S", 0.05)
    result: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    rounds: list[int] = []
    task = asyncio.create_task(_waits_then_loops(result, rounds))
    await asyncio.sleep(0)  # the task now waits inside wait_for
    result.set_result(1)  # the result and the cancellation arrive in the same turn of the loop
    await cancel_and_wait(task)
    assert task.cancelled()
    if sys.version_info < (3, 12):
        assert rounds  # the first cancellation was lost: the loop went round again


async def test_what_a_task_raised_is_retrieved_not_raised() -> None:
    async def fails() -> None:
        raise ValueError("lost connection")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(task)  # no "exception was never retrieved" report follows
    with pytest.raises(ValueError, match="lost connection"):
        task.result()
