"""`iotflow simulate`, `iotflow demo`, `iotflow bench`: the tools around the daemon (worker/tools)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from worker import extras
from worker.config import Settings
from worker.exit_codes import ExitCode


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    sim = commands.add_parser("simulate", help="publish simulated F2 and JSON device telemetry")
    sim.add_argument("--devices", type=int, default=8, help="number of devices (default 8)")
    sim.add_argument("--rate", type=float, default=50.0, help="messages/s, 0 = flat out (default 50)")
    sim.add_argument("--count", type=int, default=None, help="stop after this many messages")
    sim.add_argument("--profile", choices=("mixed", "climate"), default="mixed")
    sim.add_argument("--register", action="store_true", help="register the devices (and the demo user) first")
    sim.add_argument("--first-device", type=int, default=0, help="skip this many (parallel publishers)")
    sim.set_defaults(handler=_simulate)

    demo = commands.add_parser("demo", help="the whole path on embedded services, with live progress")
    demo.add_argument("--data-dir", type=Path, default=Path(".iotflow/demo"))
    demo.add_argument("--devices", type=int, default=8)
    demo.add_argument("--rate", type=float, default=200.0)
    demo.add_argument("--count", type=int, default=3000)
    demo.add_argument("--external", action="store_true", help="use the configured services instead")
    demo.add_argument("--keep", action="store_true", help="keep the embedded services up afterwards")
    demo.set_defaults(handler=_demo)

    bench = commands.add_parser("bench", help="measure end-to-end throughput, latency and memory")
    bench.add_argument("--messages", type=int, default=100_000)
    bench.add_argument("--devices", type=int, default=100)
    bench.add_argument(
        "--compare-fleet",
        type=int,
        default=0,
        metavar="N",
        help="also flood from N devices, alternated with --devices: the ratio of CPU per message",
    )
    bench.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    bench.add_argument("--repeat", type=int, default=2, help="flood runs per configuration, alternated")
    bench.add_argument(
        "--processes", type=int, default=1, help="also flood `iotflow run --processes N` (N > 1): the ratio"
    )
    bench.add_argument(
        "--first-contact",
        action="store_true",
        help="register no device beforehand: time the fleet's first contact (unknown_devices = register)",
    )
    bench.add_argument(
        "--cold",
        action="store_true",
        help="each run's worker meets its fleet during the run, as after a restart "
        "(default: a message per device first, unmeasured, as a long-running daemon has met it)",
    )
    bench.add_argument(
        "--rules",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the runs with 10 rules per device",
    )
    bench.add_argument(
        "--embedded", action="store_true", help="embedded PostgreSQL and Redis too (the broker always is)"
    )
    bench.add_argument(
        "--kafka",
        action="store_true",
        help="the Kafka paths too: the bridge's cost, Kafka intake with one and two processes",
    )
    bench.add_argument(
        "--kafka-bootstrap",
        default="",
        help="a Kafka to use (default: a Kafka 4 KRaft node of the bench's own, fetched through Maven)",
    )
    bench.add_argument("--kafka-partitions", type=int, default=6, help="partitions of the bench's topics")
    bench.add_argument(
        "--kafka-tls",
        action="store_true",
        help="with --kafka: also the bridge over SASL_SSL (SCRAM-SHA-512) to the bench's own Kafka, "
        "alternated with the plain bridge: the CPU TLS and the login add",
    )
    bench.add_argument(
        "--timeseries",
        choices=("postgres", "cassandra", "both"),
        default="postgres",
        help="cassandra|both: the storage step of that backend beside PostgreSQL alone, in one run "
        "(worker.tools.bench.outbox; the Cassandra IOTFLOW_CASSANDRA_HOSTS names, else with --embedded "
        "one of its own, killed and restarted once for the outage; else both mode with Cassandra down)",
    )
    bench.add_argument(
        "--deadletters",
        action="store_true",
        help="instead: the replay of --messages dead letters of a 1,000-device fleet "
        "(worker.tools.bench.deadletters): dead letters/s and CPU-seconds per 100k",
    )
    bench.add_argument(
        "--tls",
        action="store_true",
        help="instead: the worker's CPU per 100k messages with TLS on its MQTT, PostgreSQL and Redis "
        "hops against plain TCP, alternated, on servers of the bench's own (worker.tools.bench.tls)",
    )
    bench.add_argument(
        "--mappings",
        action="store_true",
        help="instead: built-in JSON against mapped JSON and the tasmota profile's rules, alternated "
        "(worker.tools.bench.mappings): CPU-seconds per 100k readings and their ratios",
    )
    bench.add_argument(
        "--http",
        action="store_true",
        help="instead: the HTTP intake beside the MQTT path (worker.tools.bench.http): requests/s, "
        "CPU-seconds per 100k readings, p99 at half rate, peak RSS, with 1- and 10-reading requests",
    )
    bench.add_argument(
        "--http-requests", type=int, default=20_000, help="requests per HTTP run (default 20,000)"
    )
    bench.add_argument(
        "--http-connections",
        type=int,
        default=1000,
        help="keep-alive connections of the HTTP runs, over --publishers client processes (default 1,000)",
    )
    bench.set_defaults(handler=_bench)


def _lacks_extra(command: str, *needed: str) -> bool:
    """True, after one line on stderr, when an extra the command needs is not installed."""
    for extra in needed:
        problem = extras.missing(extra)
        if problem:
            print(f"iotflow {command} {problem}", file=sys.stderr)
            return True
    return False


def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    if _lacks_extra("simulate", "simulator"):
        return ExitCode.CONFIG
    from worker.config import redact_url
    from worker.tools.simulate import LoginRefused, build_fleet, register_fleet, simulate

    if args.register:
        from worker.stores.devices import DeviceConflict

        fleet = build_fleet(args.devices, args.profile, first=args.first_device)
        try:
            asyncio.run(register_fleet(settings.postgres, fleet))
        except DeviceConflict as exc:  # a device of the fleet was added otherwise before
            print(f"iotflow: simulate --register: {exc}", file=sys.stderr)
            return ExitCode.CONFIG
    mqtt = settings.mqtt
    try:
        simulate(
            mqtt.url, args.devices, args.rate, args.count, args.profile, first=args.first_device,
            username=mqtt.username, password=mqtt.password,
        )  # fmt: skip
    except LoginRefused as exc:
        print(
            f"iotflow: simulate: mqtt broker at {redact_url(mqtt.url)} refused the login: {exc}",
            file=sys.stderr,
        )
        return ExitCode.CONFIG
    return ExitCode.OK


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    if _lacks_extra("demo", "tools"):
        return ExitCode.CONFIG
    from worker.tools.demo import run_demo

    return run_demo(settings, args)


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    if args.compare_fleet and args.first_contact:
        print(
            "iotflow bench: --compare-fleet floods a registered fleet; drop --first-contact", file=sys.stderr
        )
        return ExitCode.CONFIG
    if args.kafka_tls and (not args.kafka or args.kafka_bootstrap):
        print(
            "iotflow bench: --kafka-tls needs --kafka and the bench's own Kafka (no --kafka-bootstrap)",
            file=sys.stderr,
        )
        return ExitCode.CONFIG
    needed = ["tools"]
    if args.kafka:
        needed.append("kafka")
    if args.timeseries != "postgres":
        needed.append("cassandra")
    if _lacks_extra("bench", *needed):
        return ExitCode.CONFIG
    if args.deadletters:
        from worker.sinks.replay import BATCH_SIZE
        from worker.tools.bench.deadletters import run_deadletters_bench

        return run_deadletters_bench(settings, args.messages, BATCH_SIZE, args.embedded)
    if args.tls:
        from worker.tools.bench.tls import tls_bench

        return ExitCode.OK if tls_bench(settings, args) else ExitCode.FAILURE
    if args.mappings:
        from worker.tools.bench.mappings import run_mappings_bench

        return run_mappings_bench(settings, args)
    if args.http:
        from worker.tools.bench.http import run_http_bench

        return run_http_bench(settings, args)
    if args.timeseries != "postgres":
        from worker.tools.bench.outbox import run_timeseries_bench

        return run_timeseries_bench(settings, args)
    from worker.tools.bench.pipeline import run_bench

    return run_bench(settings, args)
