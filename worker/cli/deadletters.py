"""`iotflow deadletters …`: the rejected messages, listed, shown, replayed once the cause is
fixed, and purged.

    iotflow deadletters list [--reason R] [--topic FILTER] [--since T] [--limit N] [--json]
    iotflow deadletters show ID [--json]
    iotflow deadletters replay [--reason R] [--topic FILTER] [--since T] [--batch-size N] [--dry-run]
    iotflow deadletters purge --before T [--reason R]

R is a reason code (docs/decoding.md), FILTER an MQTT topic filter (`devices/+/telemetry`,
`tele/#`), T `now`, `-24h` or ISO-8601 (worker/cli/times.py); `--since` and `--before`
compare with the last receipt. The replay itself is worker/sinks/replay.py. Exit codes: 0
done (dead letters still rejected after a replay included), 1 a store unreachable, 2 bad
arguments, an unknown ID or a malformed codec file.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from schemas.records import Reason
from worker.cli.times import EXAMPLES, time_argument
from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.stores import Stores
from worker.stores.dead_letters import Selection

if TYPE_CHECKING:
    from worker.sinks.replay import Tally

REASONS = [reason.value for reason in Reason]
PREVIEW_CHARS = 40


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register `deadletters list|show|replay|purge`."""
    group = commands.add_parser("deadletters", help="rejected messages: list, show, replay, purge")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    listing = verbs.add_parser("list", help="counts per reason, then the newest dead letters")
    _selection_arguments(listing)
    listing.add_argument(
        "--limit", type=_positive, default=100, metavar="N", help="rows to show (default 100)"
    )
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list)
    showing = verbs.add_parser("show", help="one dead letter with its whole stored payload")
    showing.add_argument("id", type=_positive, metavar="ID")
    showing.add_argument("--json", action="store_true")
    showing.set_defaults(handler=_show)
    replaying = verbs.add_parser("replay", help="decode the selected dead letters again and store them")
    _selection_arguments(replaying)
    replaying.add_argument(
        "--batch-size",
        type=_positive,
        default=1000,
        metavar="N",
        help="dead letters per transaction (default 1000)",
    )
    replaying.add_argument(
        "--dry-run", action="store_true", help="print what each would become; store nothing"
    )
    replaying.set_defaults(handler=_replay)
    purging = verbs.add_parser("purge", help="delete the dead letters last seen before a time")
    purging.add_argument("--before", required=True, type=time_argument, metavar="T", help=EXAMPLES)
    purging.add_argument("--reason", choices=REASONS, metavar="R", help="only this reason code")
    purging.set_defaults(handler=_purge)


def _selection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", choices=REASONS, metavar="R", help="a reason code (docs/decoding.md)")
    parser.add_argument("--topic", metavar="FILTER", help="an MQTT topic filter: devices/+/telemetry, tele/#")
    parser.add_argument("--since", type=time_argument, metavar="T", help=f"last seen at or after: {EXAMPLES}")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number from 1")
    return int(text)


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(args.reason, args.topic, args.since)


def _run(settings: Settings, work: Callable[[Stores], Awaitable[int]]) -> int:
    from worker.stores import open_stores

    async def go() -> int:
        async with open_stores(settings, application_name="iotflow-deadletters", pool_size=2) as stores:
            return await work(stores)

    return asyncio.run(go())


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _text(payload: bytes, head: bool = False) -> str | None:
    """The payload as text when it is printable UTF-8 (new lines and tabs allowed). `head`:
    the payload's first bytes, which may end inside a character."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not (head and exc.reason == "unexpected end of data"):
            return None
        text = payload[: exc.start].decode("utf-8")
    return text if all(c.isprintable() or c in "\n\r\t" for c in text) else None


def preview(payload: bytes) -> str:
    """One short line: the text's start, or `0x` and hex for binary."""
    text = _text(payload, head=True)
    if text is None:
        return "0x" + payload[: PREVIEW_CHARS // 2].hex()
    text = " ".join(text.split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def hex_dump(payload: bytes) -> str:
    """16 bytes a line: offset, hex, and the printable ASCII."""
    lines = []
    for start in range(0, len(payload), 16):
        chunk = payload[start : start + 16]
        ascii_ = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{start:08x}  {chunk.hex(' '):<47}  |{ascii_}|")
    return "\n".join(lines)


def _reasons_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {count}" for code, count in counts.items())


# --- list, show, purge -------------------------------------------------------------------------------


def _list(settings: Settings, args: argparse.Namespace) -> int:
    from worker.stores.dead_letters import counts_by_reason, list_dead_letters

    async def work(stores: Stores) -> int:
        selection = _selection(args)
        async with stores.postgres.acquire() as conn:
            counts = await counts_by_reason(conn, selection)
            rows = await list_dead_letters(conn, selection, args.limit)
        if args.json:
            letters = [
                {
                    "id": row["id"],
                    "topic": row["topic"],
                    "reason": row["reason"],
                    "first_seen": row["received_at"],
                    "last_seen": row["last_received_at"],
                    "occurrences": row["occurrences"],
                    "payload_size": row["payload_size"],
                    "payload_preview": preview(bytes(row["head"])),
                    "capped": row["capped"],
                }
                for row in rows
            ]
            listed = {"reasons": counts, "dead_letters": letters}
            print(orjson.dumps(listed, option=orjson.OPT_INDENT_2).decode())
            return ExitCode.OK
        if not counts:
            print("no dead letters")
            return ExitCode.OK
        print(f"{'REASON':<24} {'HELD':>8}")
        for code, count in counts.items():
            print(f"{code:<24} {count:>8}")
        print()
        print(
            f"{'ID':>8}  {'REASON':<22} {'FIRST SEEN':<20}  {'LAST SEEN':<20}  {'COUNT':>6}  TOPIC  PAYLOAD"
        )
        for row in rows:
            capped = " (capped)" if row["capped"] else ""
            print(
                f"{row['id']:>8}  {row['code']:<22} {_stamp(row['received_at']):<20}  "
                f"{_stamp(row['last_received_at']):<20}  {row['occurrences']:>6}  {row['topic'][:80]}  "
                f"{preview(bytes(row['head']))}{capped}"
            )
        held = sum(counts.values())
        if held > len(rows):
            print(f"({len(rows)} of {held} shown, newest first; --limit for more)")
        return ExitCode.OK

    return _run(settings, work)


def _show(settings: Settings, args: argparse.Namespace) -> int:
    from worker.stores.dead_letters import get_dead_letter

    async def work(stores: Stores) -> int:
        async with stores.postgres.acquire() as conn:
            row = await get_dead_letter(conn, args.id)
        if row is None:
            print(f"iotflow: deadletters show: no dead letter {args.id}", file=sys.stderr)
            return ExitCode.CONFIG
        payload = bytes(row["payload"])
        text = _text(payload)
        if args.json:
            shown: dict[str, Any] = {
                key: row[key]
                for key in ("id", "topic", "topic_size", "reason", "occurrences", "payload_size", "capped")
            }
            shown |= {"first_seen": row["received_at"], "last_seen": row["last_received_at"]}
            shown |= {"payload": text} if text is not None else {"payload_hex": payload.hex()}
            print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
            return ExitCode.OK
        kept = f"{len(payload)} bytes"
        if row["payload_size"] > len(payload):
            kept = f"{row['payload_size']} bytes, the first {len(payload)} kept (capped: never replayed)"
        topic = row["topic"]
        if (row["topic_size"] or 0) > len(topic):
            topic += f"  (the first {len(topic)} of {row['topic_size']} characters: capped, never replayed)"
        for name, value in [
            ("id", row["id"]),
            ("topic", topic),
            ("reason", row["reason"]),
            ("first seen", _stamp(row["received_at"])),
            ("last seen", _stamp(row["last_received_at"])),
            ("occurrences", row["occurrences"]),
            ("payload", kept + ("" if text is not None else ", binary (hex)")),
        ]:
            print(f"{name:<12} {value}")
        print()
        print(text if text is not None else hex_dump(payload))
        return ExitCode.OK

    return _run(settings, work)


def _purge(settings: Settings, args: argparse.Namespace) -> int:
    from worker.stores.dead_letters import purge

    async def work(stores: Stores) -> int:
        async with stores.postgres.acquire() as conn:
            counts = await purge(conn, args.before, args.reason)
        purged = sum(counts.values())
        detail = f" ({_reasons_line(counts)})" if counts else ""
        print(f"purged {purged} dead letters last seen before {_stamp(args.before)}{detail}")
        return ExitCode.OK

    return _run(settings, work)


# --- replay ------------------------------------------------------------------------------------------


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from worker.cli.app import config_error
    from worker.decode.codecs import CodecConfigError

    try:
        return _run(settings, lambda stores: (_dry_run if args.dry_run else _store)(stores, args))
    except CodecConfigError as exc:
        return config_error(exc)


async def _store(stores: Stores, args: argparse.Namespace) -> int:
    from worker.sinks.replay import replay_dead_letters

    on_tty = sys.stderr.isatty()

    def progress(tally: Tally, total: int) -> None:
        print(f"\rreplaying: {tally.done}/{total}", end="", file=sys.stderr, flush=True)

    tally = await replay_dead_letters(
        stores, _selection(args), args.batch_size, progress if on_tty else _quiet
    )
    if on_tty and tally.done:
        print(file=sys.stderr)
    rejected = sum(tally.rejected.values())
    still = f" ({_reasons_line(dict(tally.rejected.most_common()))})" if rejected else ""
    print(
        f"replayed {tally.replayed} dead letters ({tally.readings} readings stored); "
        f"still rejected {rejected}{still}; skipped as capped {tally.capped}"
    )
    return ExitCode.OK


def _quiet(tally: Tally, total: int) -> None:
    """Off a terminal, only the summary line."""


async def _dry_run(stores: Stores, args: argparse.Namespace) -> int:
    from collections import Counter

    from worker.sinks.replay import judge_dead_letters

    replayed = readings = capped = 0
    rejected: Counter[str] = Counter()
    async for verdict in judge_dead_letters(stores, _selection(args), args.batch_size):
        if verdict.capped:
            capped += 1
            becomes = "skipped: capped, never replayed"
        elif verdict.rejected:
            rejected[verdict.rejected.partition(":")[0]] += 1
            becomes = f"still rejected: {verdict.rejected}"
        else:
            replayed += 1
            readings += verdict.readings
            becomes = f"{verdict.readings} readings"
        print(f"{verdict.id:>8}  {verdict.topic[:80]}  -> {becomes}")
    still = f" ({_reasons_line(dict(rejected.most_common()))})" if rejected else ""
    note = ""
    if stores.settings.pipeline.unknown_devices == "register":
        note = " (a dry run registers no device or datapoint: those it would add count as rejected)"
    print(
        f"dry run: would replay {replayed} dead letters ({readings} readings); "
        f"would stay rejected {sum(rejected.values())}{still}; skipped as capped {capped}{note}"
    )
    return ExitCode.OK
