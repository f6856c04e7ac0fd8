"""Intake actors: one source (MQTT or Kafka) into the decoder's mailbox; acknowledgements back."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from worker.runtime.cancel import cancel_and_wait


async def read_until_stopped(reading: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run `reading` until it ends or `stop` is set; re-raise what ended it (a lost connection)."""
    reader = asyncio.create_task(reading)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({reader, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        await cancel_and_wait(reader)
    if not reader.cancelled():
        reader.result()
