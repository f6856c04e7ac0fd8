"""`iotflow bench --mappings`: what a mapped JSON message costs the worker against built-in JSON.

Floods of the same readings in three forms, alternated in one run, each through a new
`iotflow run` as `iotflow bench` runs it (worker.tools.bench.support.measure_worker: its
publishers, a Mosquitto of its own, PostgreSQL, Redis, the worker's CPU from /proc):

- `json`: built-in JSON telemetry, `devices/{key}/telemetry`, `{"ts": …, "values": {3 numbers}}`;
- `mapped`: the same payload on `bench/{key}/telemetry` through a mapping (`values.*`);
- `tasmota`: a Tasmota SENSOR (`tele/{key}/SENSOR`, three numbers in `ENERGY` beside
  `Time` and `TotalStartTime`) through the rules of the shipped `tasmota` profile, reading
  `Time` as epoch ms (each message needs a time of its own: a receive time can repeat within
  a read, and a repeated timestamp is a duplicate row).

It prints CPU-seconds per 100k readings of each and the ratio of each mapped form's mean to
the built-in one's. The devices register on the warm-up message (`unknown_devices = register`).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import orjson

from worker.config import Settings
from worker.decode.mappings import profile_path
from worker.logging import configure_logging
from worker.stores.migrate import migrate
from worker.tools.bench.support import READINGS_PER_MESSAGE, RunResult, drop_run, measure_worker

FORMS = ("json", "mapped", "tasmota")
MAPPED = """
[telemetry]
topic = "bench/{device}/telemetry"
time = "ts"
time_format = "ms"
fields = [{ path = "values.*" }]
"""


def bench_mapping_file(directory: Path) -> Path:
    """The `mapped` form's mapping, and the tasmota profile's SENSOR rules reading `Time` in ms."""
    sensor = profile_path("tasmota").read_text(encoding="utf-8").split("[state]")[0]
    sensor = sensor.replace(
        'topic = "tele/{device}/SENSOR"', 'topic = "tele/{device}/SENSOR"\ntime = "Time"\ntime_format = "ms"'
    )
    path = directory / "bench.toml"
    path.write_text(MAPPED + sensor.replace("[sensor]", "[tasmota]"), encoding="utf-8")
    return path


def form_stream(form: str, devices: int, first: int) -> Iterator[tuple[str, bytes]]:
    """Endless (topic, payload) of `form`, round robin over devices `first`…, three readings
    each, every message of a device at a later millisecond."""
    keys = [f"bench-{index:06d}" for index in range(first, first + devices)]
    clock = int(time.time() * 1000) - 3_600_000  # an hour back: a long flood stays in the past
    step = 0
    while True:
        step += 1
        at = clock + step
        for key in keys:
            a, b, c = 20 + step % 50 / 10, 40 + step % 30, 1000 + step % 20
            if form == "tasmota":
                energy = {"TotalStartTime": "2024-01-01T00:00:00", "Power": a, "Voltage": b, "Current": c}
                yield f"tele/{key}/SENSOR", orjson.dumps({"Time": at, "ENERGY": energy})
            else:
                prefix = "devices" if form == "json" else "bench"
                values = {"temperature": a, "humidity": b, "pressure": c}
                yield f"{prefix}/{key}/telemetry", orjson.dumps({"ts": at, "values": values})


def run_mappings_bench(settings: Settings, args: argparse.Namespace) -> int:
    configure_logging("warning", "json")
    from worker.tools.embedded import EmbeddedServices

    with (
        tempfile.TemporaryDirectory(prefix="iotflow-mappings-bench-") as root,
        EmbeddedServices(Path(root) / "services", postgres=args.embedded, redis=args.embedded) as services,
    ):
        urls = services.start()
        if args.embedded:
            settings.postgres = replace(settings.postgres, url=urls.postgres_url)
            settings.redis = replace(settings.redis, url=urls.redis_url)
        settings.mqtt = replace(settings.mqtt, url=urls.mqtt_url)
        stamp = int(time.time())
        settings.postgres = replace(settings.postgres, schema=f"bench_mappings_{stamp}")
        settings.redis = replace(settings.redis, key_prefix=f"bench:mappings:{stamp}:")
        asyncio.run(migrate(settings.postgres))
        env = {
            "IOTFLOW_PIPELINE_UNKNOWN_DEVICES": "register",
            "IOTFLOW_RULES_ENABLED": "false",
            "IOTFLOW_DECODE_MAPPINGS": str(bench_mapping_file(Path(root))),
        }
        print(
            f"bench --mappings: {args.messages} messages × {READINGS_PER_MESSAGE} readings, "
            f"{args.devices} devices, {args.publishers} publisher processes, forms {', '.join(FORMS)} "
            f"alternated {args.repeat}×",
            flush=True,
        )
        results: dict[str, list[RunResult]] = {form: [] for form in FORMS}
        try:
            for _ in range(args.repeat):
                for form in FORMS:
                    result = measure_worker(
                        settings,
                        args.messages,
                        args.devices,
                        args.publishers,
                        form,
                        env,
                        warm=True,
                        form=form,
                    )
                    if result.rows != args.messages * READINGS_PER_MESSAGE:
                        raise RuntimeError(
                            f"{form}: {result.rows} rows, expected {args.messages * READINGS_PER_MESSAGE}"
                        )
                    results[form].append(result)
        finally:
            asyncio.run(drop_run(settings))
    report(results)
    return 0


def report(results: dict[str, list[RunResult]]) -> None:
    def per_100k_readings(run: RunResult) -> float:
        return run.cpu_s / (run.messages * READINGS_PER_MESSAGE) * 100_000

    means = {form: sum(map(per_100k_readings, runs)) / len(runs) for form, runs in results.items()}
    for form, runs in results.items():
        figures = " / ".join(f"{per_100k_readings(run):.3f}" for run in runs)
        ratio = "" if form == "json" else f" = {means[form] / means['json']:.2f}× built-in JSON"
        print(f"{form}: {figures} CPU-s per 100k readings (mean {means[form]:.3f}){ratio}", flush=True)
