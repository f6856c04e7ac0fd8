"""HTTP intake: a request body becomes one raw message on the same path as MQTT's, and the
request is answered once the writer has acknowledged it, which it does only after every
durable store has the batch (and the dead letter, for a message the decoder refused).

A request waits on a future keyed by its ack token. Tokens of this intake carry
`HTTP_PARTITION`, so the pipeline hands them here and the rest to MQTT or Kafka intake.
What became of each message is seen by `outcomes`, a sink written before the
acknowledgement: the readings the decoder counted for its token (the body is parsed once,
by the decoder), or its dead letter, matched by fingerprint. Nothing waits
unbounded: a full mailbox is refused at once (Busy), and a pipeline that stops fails every
request still waiting (Unavailable); a client then retries, which stores nothing twice
(readings are keyed by time, device and datapoint; dead letters by fingerprint).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

from schemas.records import HTTP_PARTITION, AckToken, DeadLetter, DecodedBatch, RawMessage
from worker.metrics import Metrics
from worker.runtime.actor import Actor
from worker.runtime.mailbox import Mailbox


class Busy(Exception):
    """The decoder's mailbox is full: answer 503 and let the client come back."""


class Unavailable(Exception):
    """The pipeline stopped (a restart, a shutdown) before the message was acknowledged."""


@dataclass(frozen=True, slots=True)
class Outcome:
    readings: int  # the values the message carried (0 for a dead letter)
    dead_letter: DeadLetter | None = None


@dataclass(slots=True)
class _Waiting:
    future: asyncio.Future[None]
    fingerprint: bytes
    dead_letter: DeadLetter | None = None
    readings: int = 0


class HttpIntake(Actor):
    """An actor of the pipeline, so that it lives and dies with it: stopped (upstream first),
    it takes no new message and the pipeline drains what it took; closed, it fails what is
    still waiting. The HTTP server outlives it and finds the current one through the daemon."""

    name = "http_intake"

    def __init__(self, mailbox: Mailbox[RawMessage], metrics: Metrics) -> None:
        self._stopped = asyncio.Event()
        self._mailbox = mailbox
        self._metrics = metrics
        self._mids = itertools.count(1)
        self._waiting: dict[int, _Waiting] = {}
        # Identical bodies at once share a fingerprint, and so a dead letter: each gets it.
        self._by_fingerprint: dict[bytes, list[_Waiting]] = {}
        self._closed = False
        self.outcomes = _OutcomeSink(self)

    async def submit(self, topic: str, payload: bytes) -> Outcome:
        """Once the message is stored (or its dead letter is): what became of it."""
        if self._closed:
            raise Unavailable
        if self._mailbox.qsize() >= self._mailbox.maxsize:
            raise Busy
        mid = next(self._mids)
        fingerprint = hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\0" + payload).digest()
        waiting = _Waiting(asyncio.get_running_loop().create_future(), fingerprint)
        self._waiting[mid] = waiting
        self._by_fingerprint.setdefault(fingerprint, []).append(waiting)
        received_at = time.time()
        try:
            await self._mailbox.put(RawMessage(topic, payload, received_at, AckToken(0, mid, HTTP_PARTITION)))
            self._metrics.counters["messages_received"] += 1
            await waiting.future
        finally:
            self._waiting.pop(mid, None)
            same = self._by_fingerprint[fingerprint]
            same.remove(waiting)
            if not same:
                del self._by_fingerprint[fingerprint]
        return Outcome(waiting.readings, waiting.dead_letter)

    def ack(self, tokens: Iterable[AckToken]) -> int:
        done = 0
        for token in tokens:
            waiting = self._waiting.get(token.mid)
            if waiting is not None and not waiting.future.done():
                waiting.future.set_result(None)
                done += 1
        return done

    def saw(self, batch: DecodedBatch) -> None:
        """The batch's outcomes for the requests waiting on its messages."""
        for token, readings in batch.answered.items():
            waiting = self._waiting.get(token.mid)
            if waiting is not None:
                waiting.readings = readings
        for dead_letter in batch.dead_letters:
            for waiting in self._by_fingerprint.get(dead_letter.fingerprint, ()):
                waiting.dead_letter = dead_letter

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self._closed = True
        self._stopped.set()

    async def close(self) -> None:
        """Fail every request still waiting: this pipeline will acknowledge nothing more."""
        self._closed = True
        self._stopped.set()
        for waiting in self._waiting.values():
            if not waiting.future.done():
                waiting.future.set_exception(Unavailable())


class _OutcomeSink:
    """Sees each batch before its acknowledgement, for the dead letters of HTTP messages."""

    name = "http_outcomes"

    def __init__(self, intake: HttpIntake) -> None:
        self._intake = intake

    async def write(self, batch: DecodedBatch) -> int | None:
        if batch.answered or batch.dead_letters:
            self._intake.saw(batch)
        return None

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        pass
