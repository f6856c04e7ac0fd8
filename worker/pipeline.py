"""Wiring: stores → the actor group intake → decoder → rules → writer, and the daemon around it.

The daemon opens the `Stores` once, before the supervisor starts, and closes them
after the supervisor has stopped the last actor: every incarnation of the pipeline
(a new one after each crash) borrows the same connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING

import structlog

from schemas.records import HTTP_PARTITION, AckToken, DecodedBatch, RawMessage
from worker.api.probes import Readiness, probe_routes
from worker.api.server import HttpServer
from worker.config import ConfigError, Settings
from worker.decode.codecs import Codec, CodecConfigError
from worker.decode.decoder import Decoder, configured_codecs, configured_mappings, decode_limits
from worker.decode.mappings import MappingSet
from worker.decode.ratelimit import RateLimiter
from worker.decode.registry import DatapointBudget, DeviceRegistry
from worker.exit_codes import ExitCode
from worker.intake.http import HttpIntake
from worker.intake.mqtt import MqttIntake, subscribed
from worker.logging import configure_logging
from worker.metrics import Metrics
from worker.reload import apply_reloadable, changed_settings, needs_restart
from worker.retry import STORE_BACKOFF, Refused, describe, is_transient, refusal
from worker.rules.actor import RulesActor
from worker.runtime.actor import Actor
from worker.runtime.cancel import cancel_and_wait
from worker.runtime.garbage import collect_when_idle
from worker.runtime.mailbox import Mailbox
from worker.runtime.signals import held_reload, held_stop_signal
from worker.runtime.supervisor import ActorGroup, RestartPolicy, Supervisor
from worker.sinks.alerts import AlertSink
from worker.sinks.base import Sink
from worker.sinks.hot_state import RebuildableHotState, latest_through_reads
from worker.sinks.mirror import mirrored_readings
from worker.sinks.notify.delivery import NotificationActor
from worker.sinks.notify.outbox import NotificationOutbox
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.sinks.redis_state import RedisHotStateWriter
from worker.sinks.writer import BatchWriter
from worker.stores import Stores, open_stores
from worker.stores.dead_letters import counts_by_reason
from worker.stores.migrate import schema_problem
from worker.stores.naming import refused_by_store

if TYPE_CHECKING:
    from worker.intake.kafka import KafkaIntake

log = structlog.get_logger("worker.pipeline")

# Readiness checks of stores rebuilt from the durable ones (docs/storage.md, "Redis is derived").
DERIVABLE_CHECKS = frozenset({"redis"})
# `iotflow_dead_letters_held` is counted this often (s): a GROUP BY over the whole table,
# too slow for every scrape when it holds millions of rows.
DEAD_LETTERS_HELD_REFRESH_S = 30.0


def readings_sinks(stores: Stores, metrics: Metrics) -> list[Sink]:
    """The time-series store(s) of `timeseries.backend`. With "cassandra", PostgreSQL still
    keeps the dead letters and last-seen times; with "both", one sink writes both and keeps
    what a store that is down misses in its outbox (worker/sinks/mirror.py)."""
    backend = stores.settings.timeseries.backend
    if backend == "postgres":
        return [PostgresTimeseriesWriter(stores)]
    from worker.sinks.cassandra import CassandraTimeseriesWriter

    assert stores.cassandra is not None  # open_stores opens it for these backends
    cassandra = CassandraTimeseriesWriter(stores.cassandra)
    if backend == "cassandra":
        from worker.sinks.postgres_core import PostgresCoreWriter

        return [cassandra, PostgresCoreWriter(stores)]
    return [mirrored_readings(PostgresTimeseriesWriter(stores), cassandra, stores, metrics)]


Acknowledge = Callable[[Iterable[AckToken]], int]


class Pipeline:
    """One incarnation of the actor group; the supervisor builds a new one after a crash."""

    def __init__(self, stores: Stores, metrics: Metrics, budget: DatapointBudget) -> None:
        settings = stores.settings
        self.stores = stores
        self.settings = settings
        self.metrics = metrics
        self.budget = budget
        pipeline = settings.pipeline
        self.raw: Mailbox[RawMessage] = Mailbox(pipeline.mailbox_size)
        # Decoded batches hold up to a decoder batch each; a few are enough to keep the writer busy.
        self.decoded: Mailbox[DecodedBatch] = Mailbox(max(4, pipeline.mailbox_size // Decoder.batch_max))
        self.codecs = configured_codecs(settings)
        self.mappings = configured_mappings(settings)
        self.intake: MqttIntake | KafkaIntake
        if settings.intake.source == "kafka":
            from worker.intake.kafka import KafkaIntake

            self.intake = KafkaIntake(settings.kafka, self.raw, metrics)
        else:  # the mappings' topics beside mqtt.topics, shared like them under mqtt.shared_group
            self.intake = MqttIntake(subscribed(settings.mqtt, self.mappings.filters), self.raw, metrics)
        self.rules: RulesActor | None = None
        self.decoder: Decoder | None = None
        self.http_intake: HttpIntake | None = None

    def build(self) -> ActorGroup:
        stores, settings = self.stores, self.settings
        registry = DeviceRegistry(
            stores.postgres,
            stores.redis,
            stores.keys,
            settings.pipeline.unknown_devices == "register",
            self.budget,
            cache_size=settings.pipeline.device_cache_size,
        )
        limits = decode_limits(settings)
        sinks: list[Sink] = readings_sinks(stores, self.metrics)
        acknowledge: Acknowledge = self.intake.ack
        if settings.http.api:  # HTTP telemetry beside MQTT or Kafka: the same actors
            self.http_intake = HttpIntake(self.raw, self.metrics)
            sinks.append(self.http_intake.outcomes)
            acknowledge = partial(_route_acks, self.intake.ack, self.http_intake.ack)
        hot_state = RedisHotStateWriter(stores.redis, stores.keys)
        # Derived: rebuilt from the readings store after a Redis outage, so never waited for.
        latest = None if settings.timeseries.uses_postgres else latest_through_reads(stores, "cassandra")
        derived: list[Sink] = [
            RebuildableHotState(
                hot_state,
                stores.redis.ping,
                stores.postgres,
                self.metrics,
                settings.storage.write_timeout_s,
                latest,
            )
        ]
        # The bridge: behind MQTT intake it publishes the messages and the readings (the
        # connector); behind Kafka intake only the readings (the stream processor).
        bridge_raw = stores.kafka is not None and settings.intake.source == "mqtt"
        if stores.kafka is not None:
            from worker.sinks.kafka import KafkaBridgeSink

            sinks.append(KafkaBridgeSink(stores.kafka, settings.kafka, raw=bridge_raw))
        # With rules on: decoder → `evaluating` → rules actor → `decoded` → writer, whose
        # AlertSink stores the alerts a batch caused before its messages are acknowledged.
        stages: list[Actor] = []
        decoder_out = self.decoded
        # One alert sink for both: the rules actor writes through it what no message caused.
        # With channels configured it fills the notification outbox, which `notifier` sends.
        notifier: list[Actor] = []
        if settings.rules.enabled:
            outbox = NotificationOutbox(stores.postgres, settings.notify) if settings.notify.enabled else None
            alerts = AlertSink(stores, outbox)
            self.rules = rules = RulesActor(stores, self.decoded, self.metrics, alerts)
            decoder_out = rules.mailbox
            stages.append(rules)
            sinks.append(alerts)
            if outbox is not None:
                notifier.append(NotificationActor(stores, outbox, self.metrics))
        rate_limiter = RateLimiter(
            stores.redis,
            stores.keys,
            settings.pipeline.rate_limit_messages,
            settings.pipeline.rate_limit_window_s,
        )
        self.decoder = decoder = Decoder(
            self.raw,
            decoder_out,
            self.codecs,
            limits,
            registry,
            self.metrics,
            rate_limiter,
            keep_raw=bridge_raw,
            topic_cache_size=settings.pipeline.device_cache_size,
            mappings=self.mappings,
        )
        self.writer = BatchWriter(
            self.decoded,
            sinks,
            acknowledge,
            self.metrics,
            settings.pipeline.batch_size,
            settings.pipeline.flush_interval_ms / 1000,
            settings.pipeline.slow_write_s,
            derived=derived,
        )
        intakes: list[Actor] = [self.intake] if self.http_intake is None else [self.intake, self.http_intake]
        actors: list[Actor] = [*intakes, decoder, *stages, self.writer, *notifier]
        return ActorGroup(actors, helpers=[self._report, self._collect_when_idle, self._count_dead_letters])

    def mailbox_gauges(self) -> dict[tuple[str, ...], Callable[[], float]]:
        """Messages waiting for each stage, by the stage that takes them: one unit for all,
        although the decoder's mailbox holds messages and the later ones decoded batches."""
        stages: dict[tuple[str, ...], Callable[[], float]] = {("decoder",): lambda: float(self.raw.qsize())}
        if self.rules is not None:
            stages[("rules",)] = partial(_messages_in, self.rules.mailbox)
        stages[("writer",)] = partial(_messages_in, self.decoded)
        return stages

    async def wait_ready(self) -> None:
        """Subscribed, and with rules on, the rules loaded: ready means messages are judged."""
        await self.intake.subscribed.wait()
        if self.rules is not None:
            await self.rules.loaded.wait()

    async def reload(self, codecs: dict[str, Codec], mappings: MappingSet) -> int:
        """Decode with `codecs` and `mappings` from now on and read every device's metadata
        afresh; the number of cached device entries dropped from Redis."""
        self.codecs = codecs
        self.mappings = mappings
        if self.decoder is None:
            return 0
        self.decoder.use_codecs(codecs, mappings)
        return await self.decoder.registry.reread()

    async def readiness(self) -> dict[str, bool]:
        source = "kafka_intake" if self.settings.intake.source == "kafka" else "mqtt"
        checks = {source: self.intake.connected, "sinks": not self.writer.down}
        if self.rules is not None:
            checks["rules"] = self.rules.loaded.is_set()
        checks.update(await self.stores.health())
        return checks

    @property
    def tolerated(self) -> frozenset[str]:
        """Checks that may fail while durable ingest goes on and is acknowledged (the worker
        is then ready, degraded): a derivable store (Redis: hot state rebuilt afterwards,
        device lookups from PostgreSQL, rate limits counted locally) and, in both mode,
        Cassandra (its batches wait in the `outbox` table). Never a durable store: not
        PostgreSQL, though in both mode its readings would go to the journal, since the
        registry, the dead letters' and alerts' documents live there. A batch that waits on
        a tolerated store anyway (one that raised an alert needs Redis to announce it) fails
        the `sinks` check instead."""
        both = frozenset({"cassandra"}) if self.settings.timeseries.backend == "both" else frozenset()
        return DERIVABLE_CHECKS | both

    async def _count_dead_letters(self) -> None:
        """Keep `iotflow_dead_letters_held` (by reason code) up to date; a reason no longer
        held reads 0, and while PostgreSQL is away the last counts stay."""
        gauges = self.metrics.labeled_gauges
        gauges.setdefault("dead_letters_held", {})
        while True:
            try:
                async with self.stores.postgres.acquire() as conn:
                    counts = await counts_by_reason(conn)
            except Exception as exc:
                if not is_transient(exc):
                    raise
            else:
                held = dict.fromkeys(gauges["dead_letters_held"], 0)
                held.update({(code,): n for code, n in counts.items()})
                # A new dict, swapped in whole: a scrape may be reading the old one.
                gauges["dead_letters_held"] = {key: partial(float, n) for key, n in held.items()}
            await asyncio.sleep(DEAD_LETTERS_HELD_REFRESH_S)

    async def _collect_when_idle(self) -> None:
        counters = self.metrics.counters
        await collect_when_idle(lambda: counters["messages_received"] + counters["messages_committed"])

    async def _report(self) -> None:
        """One progress line per interval, never one per message; every figure is the interval's."""
        interval = self.settings.runtime.report_interval_s
        counters = self.metrics.counters
        last_received, last_written = counters["messages_received"], counters["readings_written"]
        last_time = time.monotonic()
        latency = self.metrics.commit_latency
        mark = latency.snapshot()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            elapsed = now - last_time
            recent = latency.since(mark)
            log.info(
                "pipeline.progress",
                messages_per_s=round((counters["messages_received"] - last_received) / elapsed, 1),
                readings_per_s=round((counters["readings_written"] - last_written) / elapsed, 1),
                committed=counters["messages_committed"],
                readings=counters["readings_written"],
                dead_letters=counters["dead_letters"],
                mailbox=self.raw.qsize(),
                p99_commit_latency_s=round(recent.quantile(0.99), 4) if recent.total else None,
            )
            last_received, last_written = counters["messages_received"], counters["readings_written"]
            last_time = now
            mark = latency.snapshot()


def _route_acks(
    intake: Callable[[Iterable[AckToken]], int],
    http: Callable[[Iterable[AckToken]], int],
    tokens: list[AckToken],
) -> int:
    """HTTP intake's tokens to it, the others to MQTT or Kafka intake."""
    ours = [token for token in tokens if token.partition == HTTP_PARTITION]
    if not ours:
        return intake(tokens)
    return http(ours) + intake([token for token in tokens if token.partition != HTTP_PARTITION])


def _messages_in(mailbox: Mailbox[DecodedBatch]) -> float:
    return float(sum(batch.messages for batch in mailbox))


class Daemon:
    """`iotflow run`: the stores, the supervised pipeline and the health server."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        load_settings: Callable[[], Settings] | None = None,
    ) -> None:
        """`load_settings` reads the settings again, as at start, for a reload (SIGHUP)."""
        self.settings = settings
        self._load_settings = load_settings
        self._reloads: set[asyncio.Task[None]] = set()
        self.metrics = metrics or Metrics()
        self.pipeline: Pipeline | None = None
        self._stores: Stores | None = None
        # One per process, not per incarnation: a crash loop must not refill it.
        self.datapoint_budget = DatapointBudget(settings.pipeline.max_new_datapoints_per_hour)
        runtime = settings.runtime
        self.supervisor = Supervisor(
            self._build,
            RestartPolicy(
                limit=runtime.restart_limit,
                window_s=runtime.restart_window_s,
                backoff_s=runtime.restart_backoff_s,
                shutdown_timeout_s=runtime.shutdown_timeout_s,
            ),
            ready=self._ready,
        )
        self.ready = asyncio.Event()
        self.metrics.counted["pipeline_restarts"] = lambda: float(self.supervisor.restarts_total)
        self.http: HttpServer | None = None

    async def _build(self) -> ActorGroup:
        assert self._stores is not None  # run() opened them before starting the supervisor
        pipeline = Pipeline(self._stores, self.metrics, self.datapoint_budget)
        group = pipeline.build()
        self.pipeline = pipeline
        self.metrics.gauges["mqtt_buffered_messages"] = lambda: float(pipeline.intake.buffered)
        self.metrics.gauges["intake_unacknowledged_messages"] = lambda: float(pipeline.intake.unacknowledged)
        self.metrics.labeled_gauges["mailbox_messages"] = pipeline.mailbox_gauges()
        return group

    async def _ready(self, group: ActorGroup) -> None:
        assert self.pipeline is not None  # _build ran before the group started
        await self.pipeline.wait_ready()
        self.ready.set()

    async def _readiness(self) -> Readiness:
        if self.pipeline is not None:
            return Readiness(await self.pipeline.readiness(), self.pipeline.tolerated)
        if self._stores is not None:
            return Readiness({"pipeline": False, **await self._stores.health()})
        return Readiness({"pipeline": False, "stores": False})

    def _http_server(self) -> HttpServer:
        """The probes always; the device API with `http.api`, on the stores once open."""
        subapps = {}
        if self.settings.http.api:
            from worker.api.app import PREFIX, api_app

            subapps[PREFIX] = api_app(self.settings, lambda: self._stores, self._http_intake)
        return HttpServer(self.settings.http, probe_routes(self.metrics, self._readiness), subapps)

    def _http_intake(self) -> HttpIntake | None:
        return self.pipeline.http_intake if self.pipeline is not None else None

    def request_stop(self) -> None:
        self.supervisor.request_stop()

    def request_reload(self) -> None:
        """SIGHUP: reload in a task of its own (it reads files and talks to Redis)."""
        log.info("supervisor.signal", signal="SIGHUP")
        task = asyncio.create_task(self.reload(), name="daemon.reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> None:
        """Apply what can change safely (worker/reload.py); name what cannot. A broken
        configuration changes nothing: one line, and the running settings stay."""
        if self._load_settings is None:
            log.warning("reload.unsupported", hint="restart the daemon to change its settings")
            return
        running = self.settings
        try:
            loaded = self._load_settings()
            codecs = configured_codecs(loaded)
            mappings = configured_mappings(loaded)
        except (ConfigError, CodecConfigError, OSError) as exc:
            log.error("reload.failed", error=str(exc), hint="the running settings stay in force")
            return
        changed = changed_settings(running, loaded)
        restart = needs_restart(changed)
        if self.pipeline is not None and mappings.filters != self.pipeline.mappings.filters:
            restart.append("subscriptions")  # taken at connect: the new mappings' topics wait for a restart
        level_changed = running.log.level != loaded.log.level
        apply_reloadable(running, loaded)
        dropped, reread = 0, self.pipeline is not None  # no pipeline yet: still starting
        try:
            if self.pipeline is not None:
                dropped = await self.pipeline.reload(codecs, mappings)
        except Exception as exc:  # the settings are in force; only the device caches may be stale
            log.error("reload.devices_failed", error=describe(exc), hint="send SIGHUP again")
            reread = False
        log.info(  # before a new level applies, so that a raised level still shows it
            "reload.done",
            log_level=running.log.level,
            codecs=sorted(codecs),
            codec_file=running.pipeline.codecs or "built-in",
            mappings=[mapping.name for mapping in mappings.mappings],
            devices_reread=reread,
            cache_entries_dropped=dropped,
            changed=[name for name in changed if name not in restart],
        )
        if level_changed:
            configure_logging(running.log.level, running.log.format)
        if restart:
            log.warning("reload.restart_needed", settings=restart, hint="these keep their running values")

    async def run(self, handle_signals: bool = True) -> ExitCode:
        """Run until stopped; return the process exit code."""
        if handle_signals:  # first, so a signal however early ends in an orderly stop
            self.supervisor.install_signal_handlers()
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.request_reload)
            if held_reload():  # settings read before it came may be the old ones
                self.request_reload()
            early = held_stop_signal()
            if early is not None:
                log.info("supervisor.signal", signal=early.name, early=True)
                self.request_stop()
        code = ExitCode.FAILURE
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.settings.http.enabled:
                    self.http = self._http_server()
                    try:
                        await self.http.start()
                    except OSError as exc:  # the port is taken, or http.host is not this host's
                        log.error(
                            "http.unavailable",
                            host=self.settings.http.host,
                            port=self.settings.http.port,
                            error=describe(exc),
                            hint="free the port or change http.port / http.host",
                        )
                        code = ExitCode.CONFIG  # a restart would meet the same port
                        return code
                    stack.push_async_callback(self.http.stop)
                try:
                    self._stores = await self._open_stores(stack)
                except Refused as exc:
                    log.error("stores.refused", error=str(exc), hint=exc.hint)
                    code = ExitCode.CONFIG
                    return code
                if self._stores is None:  # stopped while waiting for them
                    code = ExitCode.OK
                    return code
                problem = await schema_problem(self._stores.postgres, self.settings.postgres.schema)
                if not problem and self.settings.timeseries.backend == "cassandra":
                    from worker.stores.cassandra_schema import schema_problem as cassandra_problem

                    assert self._stores.cassandra is not None  # verify() reached it
                    problem = await cassandra_problem(self._stores.cassandra)
                if problem:
                    log.error("schema.not_ready", problem=problem)
                    code = ExitCode.CONFIG
                    return code
                code = await self.supervisor.run()
                return code
        finally:
            await cancel_and_wait(*self._reloads)
            self._stores = None
            counters = self.metrics.counters
            # The totals the last progress line (cancelled at shutdown) cannot have; at error
            # when the exit is not 0, so that a journal filtered by priority shows it.
            report = log.info if code == ExitCode.OK else log.error
            report(
                "daemon.stopped",
                exit_code=int(code),
                received=counters["messages_received"],
                committed=counters["messages_committed"],
                readings=counters["readings_written"],
                dead_letters=counters["dead_letters"],
                restarts=self.supervisor.restarts_total,
            )

    async def _open_stores(self, stack: contextlib.AsyncExitStack) -> Stores | None:
        """Connect to the stores, waiting with backoff while one is unreachable; None if
        stopped meanwhile. No `READY=1` goes out before this returns."""
        delays = STORE_BACKOFF.delays()
        while True:
            try:
                async with contextlib.AsyncExitStack() as attempt:
                    stores = await attempt.enter_async_context(open_stores(self.settings, kafka=True))
                    await stores.verify()
                    stack.push_async_callback(attempt.pop_all().aclose)
                    return stores
            except Exception as exc:
                refused = refusal(exc)
                if refused is not None:
                    raise refused_by_store(refused, self.settings) from exc
                if not is_transient(exc):
                    raise
                delay = next(delays)
                log.warning("stores.waiting", error=describe(exc), retry_in_s=round(delay, 2))
                if await self.supervisor.wait_stopped(delay):
                    return None
