"""`iotflow bench --tls`: the worker's CPU per 100k messages with TLS on every hop it makes
(broker → worker, worker → PostgreSQL, worker → Redis) against the same path in plain TCP.

Both paths run on the same servers, started here with certificates from a CA of the run's
own (worker/tools/servers/secured.py): a Mosquitto with a plain and a TLS listener, Debian's
PostgreSQL and redis-server each taking the same password with and without TLS. The floods
alternate plain and TLS (machines drift between runs); the publishers use the plain
listener in both, so what differs is the worker's side alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from worker.config import Settings
from worker.logging import configure_logging
from worker.stores.migrate import migrate
from worker.tools.bench.support import READINGS_PER_MESSAGE, RunResult, drop_run, mean_cpu, measure_worker
from worker.tools.servers.secured import (
    SecuredMosquittoServer,
    SecuredPostgresServer,
    SecuredRedisServer,
    server_pki,
)
from worker.tools.simulate import build_fleet, register_fleet

PASSWORD = "bench-password"
TLS_BUDGET = 1.15  # TLS may cost at most 15% more of the worker's CPU than the plain path


def tls_bench(settings: Settings, args: argparse.Namespace) -> bool:
    """Prints each flood and the TLS/plain ratio of the mean CPU-s per 100k messages against
    `TLS_BUDGET`; whether every run wrote every reading (the ratio is a figure to read, not
    a verdict: on shared cores one short run can stray past it)."""
    configure_logging("warning", "json")
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="iotflow-bench-tls-")))
        pki = server_pki(root / "pki")
        broker = stack.enter_context(SecuredMosquittoServer(root / "mosquitto", pki))
        postgres = stack.enter_context(SecuredPostgresServer(root / "postgres", pki, PASSWORD, plain=True))
        redis = stack.enter_context(SecuredRedisServer(root / "redis", pki, PASSWORD, plain=True))
        stamp = int(time.time())
        plain = replace(
            settings,
            mqtt=replace(settings.mqtt, url=broker.url),
            postgres=replace(
                settings.postgres, url=postgres.url(PASSWORD, tls=False), schema=f"bench_{stamp}"
            ),
            redis=replace(settings.redis, url=redis.url(PASSWORD, tls=False), key_prefix=f"bench:{stamp}:"),
        )
        tls_env = {
            "IOTFLOW_MQTT_URL": broker.tls_url,
            "IOTFLOW_MQTT_CA_FILE": str(pki.cert_path("ca")),
            "IOTFLOW_POSTGRES_URL": postgres.url(PASSWORD),
            "IOTFLOW_REDIS_URL": redis.url(PASSWORD),
        }

        async def prepare() -> None:
            await migrate(plain.postgres)
            await register_fleet(plain.postgres, build_fleet(args.devices, "climate"))

        asyncio.run(prepare())
        print(
            "\ntls: the worker's hops plain and over TLS (Mosquitto, PostgreSQL, Redis of the run's "
            "own, CA and password alike; TLS verified against the CA)",
            flush=True,
        )
        off = {"IOTFLOW_RULES_ENABLED": "false"}
        runs: dict[str, list[RunResult]] = {"plain": [], "tls": []}
        try:
            for n in range(1, args.repeat + 1):
                for name, env in (("plain", off), ("tls", {**off, **tls_env})):
                    run = measure_worker(
                        plain,
                        args.messages,
                        args.devices,
                        args.publishers,
                        f"{name} #{n}",
                        env,
                        warm=not args.cold,
                    )
                    runs[name].append(run)
        finally:
            asyncio.run(drop_run(plain))
    ratio = mean_cpu(runs["tls"]) / mean_cpu(runs["plain"])
    verdict = "within" if ratio <= TLS_BUDGET else "over"
    print(
        f"tls: CPU-s per 100k messages, worker: plain {mean_cpu(runs['plain']):.2f}, "
        f"TLS {mean_cpu(runs['tls']):.2f}: TLS / plain {ratio:.2f}× "
        f"({verdict} the budget of {TLS_BUDGET:.2f}×)",
        flush=True,
    )
    return all(r.rows == r.messages * READINGS_PER_MESSAGE for rs in runs.values() for r in rs)
