"""Wiring: settings → the actor group intake → decoder → rules → writer, and the daemon around it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis.asyncio as aioredis
import structlog

from schemas.records import DecodedBatch, RawMessage
from worker.config import Settings
from worker.db import create_pool
from worker.decode.codecs import load_codecs
from worker.decode.decoder import Decoder
from worker.decode.parse import Limits
from worker.http import HealthServer
from worker.intake.mqtt import MqttIntake
from worker.keys import RedisKeys
from worker.metrics import Metrics
from worker.migrate import schema_problem
from worker.registry import DeviceRegistry
from worker.rules.actor import RulesActor
from worker.runtime.actor import Actor
from worker.runtime.mailbox import Mailbox
from worker.runtime.supervisor import ActorGroup, RestartPolicy, Supervisor
from worker.sinks.alerts import AlertSink
from worker.sinks.base import Sink
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.sinks.redis_state import RedisHotStateWriter
from worker.writer import BatchWriter

log = structlog.get_logger("worker.pipeline")

EXIT_CONFIG = 2  # as for a bad setting: nothing a restart would fix


class Pipeline:
    """One incarnation of the actor group; the supervisor builds a new one after a crash."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        pipeline = settings.pipeline
        self.raw: Mailbox[RawMessage] = Mailbox(pipeline.mailbox_size)
        # Decoded batches hold up to a decoder batch each; a few are enough to keep the writer busy.
        self.decoded: Mailbox[DecodedBatch] = Mailbox(max(4, pipeline.mailbox_size // Decoder.batch_max))
        self.intake = MqttIntake(settings.mqtt, self.raw, metrics)
        self.keys = RedisKeys(settings.redis.key_prefix)
        self.redis = aioredis.Redis.from_url(settings.redis.url, socket_timeout=10, socket_connect_timeout=5)
        self.codecs = load_codecs(Path(pipeline.codecs) if pipeline.codecs else None)

    async def build(self) -> ActorGroup:
        settings = self.settings
        self.pool = await create_pool(settings.postgres, min_size=1, max_size=2)
        registry = DeviceRegistry(
            self.pool, self.redis, self.keys, settings.pipeline.unknown_devices == "register"
        )
        limits = Limits(
            max_payload_bytes=settings.pipeline.max_payload_bytes,
            max_future_s=settings.pipeline.max_future_s,
            max_age_s=settings.pipeline.max_age_s,
        )
        sinks: list[Sink] = [
            PostgresTimeseriesWriter(settings.postgres, settings.pipeline.dead_letter_payload_bytes),
            RedisHotStateWriter(
                aioredis.Redis.from_url(settings.redis.url, socket_timeout=10, socket_connect_timeout=5),
                self.keys,
            ),
        ]
        # With rules on: decoder → `evaluating` → rules actor → `decoded` → writer, whose
        # AlertSink stores the alerts a batch caused before its messages are acknowledged.
        stages: list[Actor] = []
        decoder_out = self.decoded
        if settings.rules.enabled:
            rules = RulesActor(settings, self.decoded, self.pool, self.metrics)
            decoder_out = rules.mailbox
            stages.append(rules)
            sinks.append(AlertSink(settings))
        decoder = Decoder(self.raw, decoder_out, self.codecs, limits, registry, self.metrics)
        self.writer = BatchWriter(
            self.decoded,
            sinks,
            self.intake.ack,
            self.metrics,
            settings.pipeline.batch_size,
            settings.pipeline.flush_interval_ms / 1000,
        )
        actors: list[Actor] = [self.intake, decoder, *stages, self.writer, _Resources(self)]
        return ActorGroup(actors, helpers=[self._report])

    async def wait_ready(self) -> None:
        await self.intake.subscribed.wait()

    async def readiness(self) -> dict[str, bool]:
        checks = {"mqtt": self.intake.connected, "sinks": not self.writer.down}
        try:
            async with self.pool.acquire(timeout=2) as conn:
                checks["postgres"] = await conn.fetchval("SELECT true", timeout=2)
        except Exception:
            checks["postgres"] = False
        try:
            checks["redis"] = bool(await asyncio.wait_for(self.redis.ping(), 2))
        except Exception:
            checks["redis"] = False
        return checks

    async def _report(self) -> None:
        """One progress line per interval, never one per message."""
        interval = self.settings.runtime.report_interval_s
        counters = self.metrics.counters
        last_received, last_written = counters["messages_received"], counters["readings_written"]
        last_time = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            elapsed = now - last_time
            log.info(
                "pipeline.progress",
                messages_per_s=round((counters["messages_received"] - last_received) / elapsed, 1),
                readings_per_s=round((counters["readings_written"] - last_written) / elapsed, 1),
                committed=counters["messages_committed"],
                readings=counters["readings_written"],
                dead_letters=counters["dead_letters"],
                mailbox=self.raw.qsize(),
                p99_commit_latency_s=round(self.metrics.commit_latency.quantile(0.99), 4),
            )
            last_received, last_written = counters["messages_received"], counters["readings_written"]
            last_time = now


class _Resources(Actor):
    """Holds the shared pool and clients so they close after the actors that use them."""

    name = "resources"

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        self._stopped.set()
        await self._pipeline.pool.close()
        await self._pipeline.redis.aclose()


class Daemon:
    """`iotflow run`: the supervised pipeline plus the health server."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.pipeline: Pipeline | None = None
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
        self.metrics.gauges["pipeline_restarts"] = lambda: float(self.supervisor.restarts_total)
        self.health: HealthServer | None = None

    async def _build(self) -> ActorGroup:
        pipeline = Pipeline(self.settings, self.metrics)
        group = await pipeline.build()
        self.pipeline = pipeline
        self.metrics.gauges["mqtt_buffered"] = lambda: float(pipeline.intake.buffered)
        self.metrics.gauges["mailbox_raw"] = lambda: float(pipeline.raw.qsize())
        self.metrics.gauges["mailbox_decoded"] = lambda: float(pipeline.decoded.qsize())
        return group

    async def _ready(self, group: ActorGroup) -> None:
        assert self.pipeline is not None  # _build ran before the group started
        await self.pipeline.wait_ready()
        self.ready.set()

    async def _readiness(self) -> dict[str, bool]:
        return await self.pipeline.readiness() if self.pipeline else {"pipeline": False}

    def request_stop(self) -> None:
        self.supervisor.request_stop()

    async def run(self, handle_signals: bool = True) -> int:
        """Run until stopped; return the process exit code."""
        problem = await schema_problem(self.settings.postgres)
        if problem:
            log.error("schema.not_ready", problem=problem)
            return EXIT_CONFIG
        if handle_signals:
            self.supervisor.install_signal_handlers()
        if self.settings.http.enabled:
            self.health = HealthServer(self.settings.http, self.metrics, self._readiness)
            await self.health.start()
        code = 1
        try:
            code = await self.supervisor.run()
            return code
        finally:
            if self.health is not None:
                await self.health.stop()
            counters = self.metrics.counters
            log.info(  # the totals the last progress line (cancelled at shutdown) cannot have
                "daemon.stopped",
                exit_code=code,
                received=counters["messages_received"],
                committed=counters["messages_committed"],
                readings=counters["readings_written"],
                dead_letters=counters["dead_letters"],
                restarts=self.supervisor.restarts_total,
            )


async def run_daemon(settings: Settings) -> int:
    return await Daemon(settings).run()
