"""`iotflow mappings …`: what the topic and JSON mappings enable, and what a message becomes.

    iotflow mappings list
    iotflow mappings test --topic T --payload P

`test` decodes one message as the daemon would (the settings' codecs, mappings and limits)
and prints its readings, or the reason it would be a dead letter; it looks up no device and
touches no store. Exit codes: 0 readings (or a message the mappings ignore), 1 a dead letter,
2 a malformed mapping or codec file.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from worker.config import Settings
from worker.exit_codes import ExitCode


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register `mappings list|test`."""
    group = commands.add_parser("mappings", help="topic and JSON mappings: list them, test a message")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("list", help="the enabled mappings, ignored topics and subscriptions").set_defaults(
        handler=_list
    )
    testing = verbs.add_parser("test", help="the readings a message would give, or its dead-letter reason")
    testing.add_argument("--topic", required=True, metavar="T", help="the MQTT topic")
    testing.add_argument("--payload", required=True, metavar="P", help="the payload, as text")
    testing.set_defaults(handler=_test)


def _list(settings: Settings, args: argparse.Namespace) -> int:
    from worker.cli.app import config_error
    from worker.decode.mappings import MappingConfigError, load_mappings, profile_names, profile_path
    from worker.intake.mqtt import subscribed, subscription_filters

    try:
        mappings = load_mappings(settings.decode.profiles, settings.decode.mappings)
    except MappingConfigError as exc:
        return config_error(exc)
    profiles = {str(profile_path(name)): f"profile {name}" for name in profile_names()}
    rows = [("mapping", "topic", "device", "from")]
    for mapping in mappings.mappings:
        device = mapping.levels[mapping.device] or ""
        rows.append(
            (mapping.name, mapping.topic, f"{{{device}}}", profiles.get(mapping.source, mapping.source))
        )
    if len(rows) == 1:
        print("no mappings (decode.profiles, decode.mappings): the built-in layouts only")
    else:
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        for row in rows:
            print(
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[3]
            )
    for pattern, source in mappings.ignore_topics:
        print(f"ignored: {pattern} ({profiles.get(source, source)})")
    if settings.intake.source == "kafka":
        print("subscribes to: nothing (intake.source = kafka: every topic arrives in kafka.raw_topic)")
    else:
        filters = subscription_filters(subscribed(settings.mqtt, mappings.filters))
        print(f"subscribes to: {', '.join(filters)}")
    return ExitCode.OK


def _test(settings: Settings, args: argparse.Namespace) -> int:
    from worker.cli.app import config_error
    from worker.decode.codecs import CodecConfigError
    from worker.decode.decoder import configured_codecs, configured_mappings, decode_limits
    from worker.decode.parse import Ignored, Rejected, parse_message

    try:
        codecs, mappings = configured_codecs(settings), configured_mappings(settings)
    except CodecConfigError as exc:  # a MappingConfigError too
        return config_error(exc)
    payload = args.payload.encode("utf-8", "surrogateescape")
    try:
        parsed = parse_message(args.topic, payload, time.time(), codecs, decode_limits(settings), mappings)
    except Ignored:
        print(f"ignored: {args.topic} (acknowledged, nothing stored)")
        return ExitCode.OK
    except Rejected as exc:
        print(f"dead letter: {exc.reason}: {exc.detail}")
        return ExitCode.FAILURE
    units = parsed.units or [None] * len(parsed.labels)
    texts = parsed.texts or [None] * len(parsed.labels)
    device = f"{parsed.device.kind} {parsed.device.value}"
    columns = zip(parsed.labels, parsed.values, texts, units, parsed.timestamps, strict=True)
    for label, value, text, unit, timestamp in columns:
        shown = repr(text) if text is not None else f"{value:g}"
        print(f"{device}  {label}  {shown}  {unit or '-'}  {timestamp.isoformat()}")
    for skipped in parsed.skipped:
        print(f"skipped: {skipped} (a skipped_fields dead letter beside the readings)")
    return ExitCode.OK
