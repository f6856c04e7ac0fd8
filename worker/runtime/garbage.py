"""The daemon's garbage-collection policy: tuned thresholds, and full collections while idle.

CPython's default young-generation threshold (700 allocations) collects every few dozen
messages; each collection promotes the batch objects still in flight (readings wait for
their commit) to the older generations, whose full collections then walk every cached
device and topic: a cost per message that grew with the fleet (docs/performance.md,
"Fleet size"). At 50,000 a batch's objects are mostly gone before a collection looks at
them.

The older generations' collections walk every long-lived object: with 20,000 devices and
their 200,000 rules' state, some 340,000 of them, 120–190 ms on the development machine.
They come when the counts say so, as often as not under load, where they hold up every
message in flight; after a fleet's first contact one was due with the next flood
(docs/performance.md, "Fleet size, measured in one run"). So once nothing has arrived or
been committed for a period and objects are pending, the daemon collects
(`collect_when_idle`): that work is done while no message waits for it.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

GC_THRESHOLDS = (50_000, 10, 10)
IDLE_PERIOD_S = 1.0
# Net new objects since the last collection worth a full one while idle (or any young
# collection since the last full one: it left objects in the middle generation).
IDLE_PENDING_MIN = 10_000


def tune_gc() -> None:
    """For a daemon process, once its start-up is done."""
    gc.freeze()  # what start-up built (modules, settings, codecs) is never walked again
    gc.set_threshold(*GC_THRESHOLDS)


def pending() -> bool:
    """Whether a full collection now would find anything the last one did not walk."""
    young, middle, old = gc.get_count()
    return young >= IDLE_PENDING_MIN or middle > 0 or old > 0


async def collect_when_idle(activity: Callable[[], float], period_s: float = IDLE_PERIOD_S) -> None:
    """Forever: a full collection after each period in which `activity` (a count of what
    the pipeline did) stood still, when something is pending."""
    last = activity()
    while True:
        await asyncio.sleep(period_s)
        now = activity()
        if now == last and pending():
            gc.collect()
        last = now
