"""The daemon's collections while idle (worker/runtime/garbage.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import Callable, Iterator
from itertools import count

import pytest

from worker.runtime.garbage import IDLE_PENDING_MIN, collect_when_idle, pending


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only a collection frees it


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _garbage() -> tuple[weakref.ref[_Node], list[list[int]]]:
    """A cycle no reference reaches, and enough live objects to make a collection due."""
    node = _Node()
    freed = weakref.ref(node)
    del node
    return freed, [[n] for n in range(IDLE_PENDING_MIN)]


async def _run_for(periods: int, activity: Callable[[], float]) -> None:
    task = asyncio.create_task(collect_when_idle(activity, period_s=0.01))
    try:
        await asyncio.sleep(periods * 0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.usefixtures("no_automatic_gc")
async def test_an_idle_pipeline_is_collected() -> None:
    freed, live = _garbage()
    assert pending()
    await _run_for(20, lambda: 7)
    assert freed() is None
    assert not pending()
    assert len(live) == IDLE_PENDING_MIN  # what is alive stays


@pytest.mark.usefixtures("no_automatic_gc")
async def test_a_busy_pipeline_is_left_alone() -> None:
    freed, _ = _garbage()
    ticks = count()
    await _run_for(20, lambda: next(ticks))
    assert freed() is not None  # every period saw work: no collection
    assert pending()


@pytest.mark.usefixtures("no_automatic_gc")
async def test_nothing_pending_is_no_collection() -> None:
    gc.collect()
    node = _Node()
    freed = weakref.ref(node)
    del node  # one cycle: too little to collect for
    assert not pending()
    await _run_for(20, lambda: 7)
    assert freed() is not None
