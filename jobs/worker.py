"""The arq worker: job functions, the scheduling cron tick, and the stores opened per process.

`build_worker(settings)` is what `iotflow jobs run` starts; run more processes to scale
out, they share the queue in Redis. The plain `arq` command works too, through
`jobs.arq_settings.WorkerSettings`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from arq import cron, func
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker

from jobs.context import CTX_KEY, open_resources
from jobs.schedule import schedule_tick
from jobs.tasks import FUNCTIONS
from worker.config import Settings
from worker.runtime.sdnotify import notify, watchdog_interval, watchdog_loop
from worker.stores.migrate import SchemaNotReady, schema_problem

SETTINGS_KEY = "settings"
CLOCK_KEY = "clock"
WATCHDOG_KEY = "watchdog"
STORES_KEY = "stores"  # the exit stack that closes the stores at shutdown


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx[SETTINGS_KEY]
    stack = contextlib.AsyncExitStack()
    resources = await stack.enter_async_context(open_resources(settings, clock=ctx.get(CLOCK_KEY)))
    # Before any job: against a schema never migrated every one would fail, each with its line.
    problem = await schema_problem(resources.pool, settings.postgres.schema)
    if problem:
        await stack.aclose()
        raise SchemaNotReady(problem)
    ctx[CTX_KEY] = resources
    ctx[STORES_KEY] = stack
    # Under systemd (Type=notify): ready once the stores are open; the watchdog proves the loop runs.
    notify("READY=1")
    interval = watchdog_interval()
    if interval:
        ctx[WATCHDOG_KEY] = asyncio.create_task(watchdog_loop(interval))


async def _shutdown(ctx: dict[str, Any]) -> None:
    notify("STOPPING=1")
    watchdog = ctx.pop(WATCHDOG_KEY, None)
    if watchdog is not None:
        watchdog.cancel()
    ctx.pop(CTX_KEY, None)
    stack = ctx.pop(STORES_KEY, None)
    if stack is not None:
        await stack.aclose()


def redis_settings(settings: Settings) -> RedisSettings:
    """arq's connection settings from `redis.url`, read by redis-py's own URL parser, so the
    queue connects as the daemon's client does: arq's `from_dsn` keeps a percent-encoded
    password encoded and drops the TLS options (`ssl_ca_certs`, `ssl_certfile`, …)."""
    from redis.asyncio.connection import SSLConnection, parse_url

    url: dict[str, Any] = dict(parse_url(settings.redis.url))
    tls = url.get("connection_class") is SSLConnection
    options: dict[str, Any] = {
        "host": url.get("host", "localhost"),
        "port": url.get("port", 6379),
        "database": url.get("db", 0),
        "username": url.get("username"),
        "password": url.get("password"),
        "ssl": tls,
    }
    if tls:
        for name in ("ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_check_hostname"):
            if name in url:
                options[name] = url[name]
    return RedisSettings(**options)


def worker_options(
    settings: Settings, *, cron_jobs: bool = True, clock: Callable[[], datetime] | None = None
) -> dict[str, Any]:
    """Keyword arguments of arq's `Worker` for these settings."""
    cfg = settings.jobs
    functions = [
        # arq's own try limit sits one above ours: the last of our tries records the failure itself.
        func(f, max_tries=cfg.max_tries + 1, timeout=cfg.job_timeout_s, keep_result=cfg.keep_result_s)
        for f in FUNCTIONS
    ]
    ctx: dict[str, Any] = {SETTINGS_KEY: settings}
    if clock is not None:
        ctx[CLOCK_KEY] = clock
    return {
        "functions": functions,
        # The tick's name carries the queue: arq's cron job ids are global to the Redis database.
        "cron_jobs": [
            cron(schedule_tick, name=f"{settings.jobs_queue}:schedule", second=0, run_at_startup=True)
        ]
        if cron_jobs
        else [],
        "queue_name": settings.jobs_queue,
        "redis_settings": redis_settings(settings),
        "on_startup": _startup,
        "on_shutdown": _shutdown,
        "ctx": ctx,
        "max_jobs": cfg.max_jobs,
        "job_timeout": cfg.job_timeout_s,
        "keep_result": cfg.keep_result_s,
        "max_tries": cfg.max_tries + 1,
        "timezone": UTC,
    }


def build_worker(
    settings: Settings,
    *,
    cron_jobs: bool = True,
    burst: bool = False,
    handle_signals: bool = True,
    redis_pool: ArqRedis | None = None,
    clock: Callable[[], datetime] | None = None,
    **overrides: Any,
) -> Worker:
    options = worker_options(settings, cron_jobs=cron_jobs, clock=clock)
    if redis_pool is not None:
        options.pop("redis_settings")
        options["redis_pool"] = redis_pool
    options.update(overrides)
    return Worker(burst=burst, handle_signals=handle_signals, **options)
