"""The rules actor: between the decoder and the writer, it judges every reading against the rules.

Alert events a batch causes travel with that batch (`DecodedBatch.alerts`) to the
writer, whose `AlertSink` stores them before the batch's messages are
acknowledged. Events no message caused — offline alerts from the timer, alerts
closed because their rule was withdrawn — are written here directly, with the
writer's retry policy; the actor waits for them, so while the store is away
backpressure builds exactly as it does behind the writer.

Rules (and the saved state) are loaded as the actor starts, before it takes any
mail: batches decoded meanwhile wait in its mailbox, and `loaded` is what the daemon's
readiness waits for (`Pipeline.wait_ready`, so no `READY=1` while the rules are not in
force). A store away at start is waited out as everywhere (`rules.load.unavailable`).
They are reloaded in a background task — at once when `iotflow rules`
announces a change on Redis, otherwise every `rules.refresh_s`. The new rule set is
swapped in between batches, so evaluation never sees half a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence

import redis.exceptions
import structlog
from redis.asyncio.client import PubSub

from schemas.records import AlertEvent, DecodedBatch
from worker.metrics import Metrics
from worker.retry import STORE_BACKOFF, retry_transient
from worker.rules.evaluator import Clock, Evaluator, utc_now
from worker.rules.events import AlertWriter
from worker.rules.source import LoadedRules, RuleProblem, RuleSource, rules_channel
from worker.rules.state import SavedState, load_state
from worker.runtime.actor import MailboxActor
from worker.runtime.cancel import cancel_and_wait
from worker.runtime.mailbox import Mailbox
from worker.stores import Stores
from worker.stores import redis as redis_store

log = structlog.get_logger("worker.rules")


class RulesActor(MailboxActor[DecodedBatch]):
    name = "rules"
    batch_max = 64
    # A gap between ticks longer than this (s, monotonic) is a stall, not a quiet fleet.
    stall_s = 1.0

    def __init__(
        self,
        stores: Stores,
        downstream: Mailbox[DecodedBatch],
        metrics: Metrics,
        alerts: AlertWriter,
        clock: Clock = utc_now,
    ) -> None:
        """The inbox (`self.mailbox`) is the actor's own, the size of `downstream`; `alerts`
        stores the events no message caused (the writer's alert sink)."""
        super().__init__(Mailbox(downstream.maxsize))
        self._stores = stores
        self._settings = stores.settings.rules
        self._downstream = downstream
        self._metrics = metrics
        self._clock = clock
        self._source = RuleSource(stores.documents, stores.postgres)
        self._sink = alerts
        self._channel = rules_channel(stores.keys)
        self._evaluator: Evaluator | None = None
        self._signature = ""
        self._invalidated = asyncio.Event()
        self._reload: asyncio.Task[LoadedRules | None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._next_refresh = 0.0
        self._next_offline = 0.0
        self._last_tick = 0.0
        self._problems = 0
        self.loaded = asyncio.Event()
        metrics.gauges["rules_loaded"] = lambda: float(len(self._evaluator.rules) if self._evaluator else 0)
        metrics.gauges["rules_invalid"] = lambda: float(self._problems)
        metrics.gauges["alerts_active"] = lambda: float(
            self._evaluator.active_count if self._evaluator else 0
        )

    @property
    def evaluator(self) -> Evaluator | None:
        return self._evaluator

    async def prepare(self) -> None:
        self._evaluator = await self._start()
        self.loaded.set()

    async def handle(self, items: list[DecodedBatch]) -> None:
        evaluator = self._evaluator
        assert evaluator is not None  # `prepare` ran before any mail
        for batch in items:
            if batch.readings:
                events = evaluator.evaluate(batch.readings, batch.device_users)
                if events:
                    batch.alerts.extend(events)
                    self._record(events)
            await self._downstream.put(batch)

    async def tick(self) -> None:
        evaluator = self._evaluator
        assert evaluator is not None
        now = time.monotonic()
        if now - self._last_tick > self.stall_s:
            # The actor was held up (blocked on a full writer mailbox while the store was away,
            # or writing alerts itself): readings waited upstream meanwhile, so the silence
            # seen now is ours, not the devices'. Count offline silence from now, as after
            # a restart.
            evaluator.hold_offline(self._clock())
            log.info("rules.offline_held", stalled_s=round(now - self._last_tick, 3))
        self._last_tick = now
        if self._reload is not None:
            if self._reload.done():
                await self._finish_reload(self._reload)
                self._reload = None
        elif self._invalidated.is_set() or now >= self._next_refresh:
            self._invalidated.clear()
            self._next_refresh = now + self._settings.refresh_s
            self._reload = asyncio.create_task(self._source.load(), name="rules.reload")
        if now >= self._next_offline:
            self._next_offline = now + self._settings.offline_check_s
            events = evaluator.check_offline()
            if events:
                await self._write_direct(events)

    async def drained(self) -> None:
        await self._cancel_tasks()

    async def close(self) -> None:
        await self._cancel_tasks()

    # --- start -----------------------------------------------------------------------------------

    async def _start(self) -> Evaluator:
        """Load rules and saved state, retrying while a store is away (mail waits meanwhile)."""
        rules = self._settings
        loaded, state = await retry_transient(self._load_everything, "rules.load")
        evaluator = Evaluator(loaded.ruleset, self._clock)
        self._signature = loaded.signature
        self._report(loaded)
        withdrawn = evaluator.restore(state.alerts, state.last_seen, state.users)
        if withdrawn:
            await self._write_direct(withdrawn)
        # Events stored but never announced (a crash in between): their readings, if
        # redelivered, are now skipped as judged, so nothing else would announce them.
        announced = await retry_transient(
            self._sink.announce_pending, "rules.announce", reset=self._sink.reset
        )
        if announced:
            log.info("rules.announced_pending", events=announced)
        log.info(
            "rules.started",
            rules=len(loaded.ruleset),
            invalid=len(loaded.problems),
            active_alerts=evaluator.active_count,
        )
        now = time.monotonic()
        self._next_refresh = now + rules.refresh_s
        self._next_offline = now + rules.offline_check_s
        self._last_tick = now
        self._listener = asyncio.create_task(self._listen(), name="rules.listen")
        return evaluator

    async def _load_everything(self) -> tuple[LoadedRules, SavedState]:
        loaded = await self._source.load(force=True)
        assert loaded is not None  # force=True always loads
        state = await load_state(
            self._stores.documents, self._stores.postgres, self._settings.restore_resolved
        )
        return loaded, state

    # --- reloads ---------------------------------------------------------------------------------

    async def _finish_reload(self, task: asyncio.Task[LoadedRules | None]) -> None:
        assert self._evaluator is not None
        try:
            loaded = task.result()
        except Exception as exc:  # keep evaluating with the rules we have; try again next period
            log.error("rules.reload_failed", error=repr(exc))
            return
        if loaded is None or loaded.signature == self._signature:
            return
        self._signature = loaded.signature
        self._report(loaded)
        withdrawn = self._evaluator.replace_rules(loaded.ruleset)
        log.info("rules.reloaded", rules=len(loaded.ruleset), invalid=len(loaded.problems))
        if withdrawn:
            await self._write_direct(withdrawn)

    def _report(self, loaded: LoadedRules) -> None:
        """One log line per malformed rule, once per distinct set of rules."""
        self._problems = len(loaded.problems)
        problem: RuleProblem
        for problem in loaded.problems:
            log.warning("rules.invalid", config=problem.config, field=problem.path, problem=problem.problem)

    async def _listen(self) -> None:
        """Set `_invalidated` on every announcement; resubscribe (and reload) after a lost connection."""
        delays = STORE_BACKOFF.delays()
        broken_delays = STORE_BACKOFF.delays()  # unexpected errors: a backoff never reset, logged once
        broken = False
        first = True
        while True:
            pubsub = self._stores.redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                if not first:
                    self._invalidated.set()  # announcements may have been missed meanwhile
                first = False
                delays = STORE_BACKOFF.delays()
                await self._receive(pubsub)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                delay = next(delays)
                log.warning("rules.announcements_lost", error=repr(exc), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
            except Exception as exc:  # a bug or an odd reply: keep listening, or reloads lag refresh_s
                delay = next(broken_delays)
                if not broken:
                    broken = True
                    log.error("rules.announcements_failed", error=repr(exc), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _receive(self, pubsub: PubSub) -> None:
        """Wait for announcements as long as the connection lives, however quiet the channel.

        A read with the client's socket timeout would fail every few seconds on an idle
        channel; instead each wait lasts one health-check interval, after which a PING
        goes out, and a connection that has not answered it by the next interval is dead.
        """
        interval = redis_store.HEALTH_CHECK_S
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=interval)
            now = loop.time()
            if message is not None:
                heard, pinged = now, False
                if message.get("type") == "message":
                    self._invalidated.set()
            elif now - heard < interval:
                continue
            elif not pinged:
                await pubsub.ping()
                pinged = True
            elif now - heard >= 2 * interval:
                raise redis.exceptions.TimeoutError(f"no answer to a PING within {interval} s")

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in (self._listener, self._reload) if t is not None]
        self._listener = self._reload = None
        await cancel_and_wait(*tasks)

    # --- output ----------------------------------------------------------------------------------

    async def _write_direct(self, events: Sequence[AlertEvent]) -> None:
        """Store events no message caused, with the writer's retry policy (see the module doc)."""
        self._record(events)
        await retry_transient(
            lambda: self._sink.write_events(events),
            "rules.alert_write",
            reset=self._sink.reset,
            holding=len(events),
        )

    def _record(self, events: Sequence[AlertEvent]) -> None:
        kinds = Counter(event.kind for event in events)
        for (kind, severity), count in Counter((e.kind, e.severity) for e in events).items():
            self._metrics.inc("alerts", count, kind=kind, severity=severity)
        log.info(
            "rules.alerts",
            **{kind: count for kind, count in kinds.items()},
            examples=[f"{e.kind}: {e.message}" for e in events[:3]],
        )
