"""The rules actor's inbox: waits for mail without a timer per wait, woken by a ticker instead.

`Mailbox.get_batch` bounds each wait with `asyncio.wait_for`, which creates a task
and a timer per wait. The rules actor sits between two busy stages and usually
wakes for one small batch at a time, so that cost came once per batch: measured,
a third of the extra CPU the rules stage added to the pipeline. Here a wait
with a timeout waits for mail alone, and the actor's ticker posts `WAKE` while the
inbox is idle, so `tick` still runs at least every `idle_timeout`.
"""

from __future__ import annotations

import asyncio

from schemas.records import DecodedBatch
from worker.runtime.mailbox import Mailbox

WAKE = DecodedBatch()  # a wake-up call from the ticker: never evaluated, never forwarded


class WokenMailbox(Mailbox[DecodedBatch]):
    async def get_batch(self, max_items: int, timeout: float | None) -> list[DecodedBatch]:
        # 0 still means "only what is there" (the actor is stopping); any wait is unbounded.
        return await super().get_batch(max_items, None if timeout else timeout)

    async def ticker(self, period: float) -> None:
        """Post `WAKE` every `period` while the inbox is empty; run as a task."""
        while True:
            await asyncio.sleep(period)
            if self.empty():
                await self.put(WAKE)  # cannot block: the inbox is empty
