"""Cancelling tasks so that they end, on Python 3.11 too.

Python 3.11's `asyncio.wait_for` returns the awaited result instead of raising when a
cancellation arrives just as that result does (fixed in 3.12, python/cpython#86296), and
redis-py 5 (arq keeps it below 6) sends every command through it. A task cancelled at that
moment runs on as if nothing had happened: a loop such as the rules' pub/sub listener,
which PINGs its connection every health-check interval, then never ends, and whoever
awaits it hangs. `cancel_and_wait` cancels again whatever is still running a moment later.
Our own timeouts use `asyncio.timeout`, which does not lose a cancellation.
"""

from __future__ import annotations

import asyncio
from typing import Any

RECANCEL_S = 1.0  # long enough for a cancelled task's own clean-up (closing a connection)


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel `tasks` and return once every one has ended.

    What they raised is retrieved (so asyncio does not report it as never retrieved) but
    not re-raised: a caller that wants it reads `task.result()` afterwards.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    for task in tasks:
        if not task.cancelled():
            task.exception()
