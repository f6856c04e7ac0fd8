"""The daemon's garbage-collection policy: tuned thresholds, and collections while idle.

CPython's default young-generation threshold (700 allocations) collects every few dozen
messages; each collection promotes the batch objects still in flight (readings wait for
their commit) to the older generations, whose full collections then walk every cached
device and topic: a cost per message that grew with the fleet (docs/performance.md,
"Fleet size"). At 50,000 a batch's objects are mostly gone before a collection looks at
them.

A fleet's first contact leaves its state (devices, topics, with rules a tracker per rule
and device: some 340,000 objects for 20,000 devices with 10 rules each) in the young and
middle generations; the middle generation's next collection walks all of it, 110–160 ms
on the development machine, as often as not under the next flood, where it holds up
every message in flight (docs/performance.md, "Why a larger fleet costs more"). So once
nothing has arrived or been committed for a short period and objects are pending, the
daemon collects those two generations itself (`collect_when_idle`): work the thresholds
would have asked for soon, done while no message waits for it. The oldest generation is
left to CPython's own rule, which collects it rarely: walking it costs the most.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

GC_THRESHOLDS = (50_000, 10, 10)
IDLE_PERIOD_S = 0.25
# Net new objects since the last collection worth one while idle (or any young collection
# since the middle generation's last: it left objects there).
IDLE_PENDING_MIN = 10_000


def tune_gc() -> None:
    """For a daemon process, once its start-up is done."""
    gc.freeze()  # what start-up built (modules, settings, codecs) is never walked again
    gc.set_threshold(*GC_THRESHOLDS)


def pending() -> bool:
    """Whether the young and middle generations hold enough to collect."""
    young, middle, _ = gc.get_count()
    return young >= IDLE_PENDING_MIN or middle > 0


async def collect_when_idle(activity: Callable[[], float], period_s: float = IDLE_PERIOD_S) -> None:
    """Forever: the young and middle generations collected after each period in which
    `activity` (a count of what the pipeline did) stood still, when something is pending."""
    last = activity()
    while True:
        await asyncio.sleep(period_s)
        now = activity()
        if now == last and pending():
            gc.collect(1)
        last = now
