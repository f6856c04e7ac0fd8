"""The mailbox's batch put: the bound counts items, order is kept, waiting putters go first."""

from __future__ import annotations

import asyncio

from worker.runtime.mailbox import Mailbox


async def test_put_some_fills_to_the_bound_then_waits_for_room() -> None:
    mailbox: Mailbox[int] = Mailbox(5)
    assert await mailbox.put_some([0, 1, 2]) == 3
    assert await mailbox.put_some([3, 4, 5, 6]) == 2  # room for two: the bound counts items
    assert mailbox.qsize() == 5
    waiting = asyncio.ensure_future(mailbox.put_some([5, 6]))
    await asyncio.sleep(0)
    assert not waiting.done()  # full: it waits, holding nothing beyond the bound
    assert await mailbox.get_batch(2, None) == [0, 1]
    assert await waiting == 1  # woken for the room one `get` made, in turn like `put`
    assert await mailbox.put_some([6]) == 1
    assert await mailbox.get_batch(10, None) == [2, 3, 4, 5, 6]
    assert await mailbox.put_some([]) == 0


async def test_put_some_queues_behind_a_waiting_put() -> None:
    mailbox: Mailbox[str] = Mailbox(1)
    await mailbox.put("a")
    first = asyncio.ensure_future(mailbox.put("b"))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(mailbox.put_some(["c", "d"]))
    await asyncio.sleep(0)
    assert await mailbox.get_batch(1, None) == ["a"]
    await first
    assert await mailbox.get_batch(1, None) == ["b"]
    assert await second == 1
    assert await mailbox.get_batch(1, None) == ["c"]
