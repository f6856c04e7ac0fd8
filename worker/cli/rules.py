"""`iotflow rules …` and `iotflow alerts …`: manage rules, list and acknowledge alerts.

    iotflow rules list [--device DEVICE | --group ID | --global] [--json]
    iotflow rules set (--device DEVICE | --group ID | --global) RULE
    iotflow rules delete (--device DEVICE | --group ID | --global) RULE_ID
    iotflow rules import FILE [--dry-run]
    iotflow alerts list [--active] [--device DEVICE] [--limit N] [--json]
    iotflow alerts ack ALERT_ID [--by NAME]
    iotflow alerts test

RULE is a JSON object or `key=value` pairs (values are read as JSON when they
parse, as text otherwise): `type=threshold field=temperature condition=">" value=30`.
DEVICE is a device id, device_key or MAC. Exit codes (worker.exit_codes): 0 done, 1
refused (malformed rule, no such rule, group or alert; a notification channel that did
not take the test), 2 an unknown device or no notification channel configured.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tomllib
from pathlib import Path
from typing import Any

import orjson

from worker.cli.device_ref import DEVICE_HELP, unknown_device
from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.rules.admin import InvalidRules, RuleAdmin, open_admin
from worker.rules.messages import describe
from worker.rules.model import RuleError, Scope
from worker.stores.devices import UnknownDevice, find_device_id


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register the rules and alerts sub-commands."""
    rules = commands.add_parser("rules", help="list, set, delete and import alert rules")
    verbs = rules.add_subparsers(dest="verb", required=True, metavar="VERB")

    listing = verbs.add_parser("list", help="rules in force, and the malformed ones with why")
    _scope_options(listing, required=False)
    listing.add_argument("--json", action="store_true", help="print the config documents as JSON")
    listing.set_defaults(handler=_rules_list)

    setting = verbs.add_parser("set", help="add a rule, or replace the one with the same id")
    _scope_options(setting, required=True)
    setting.add_argument("rule", nargs="+", metavar="RULE", help="a JSON object or key=value pairs")
    setting.set_defaults(handler=_rules_set)

    deleting = verbs.add_parser("delete", help="remove a rule by id")
    _scope_options(deleting, required=True)
    deleting.add_argument("rule_id", metavar="RULE_ID")
    deleting.set_defaults(handler=_rules_delete)

    importing = verbs.add_parser("import", help="replace the rules of the scopes a JSON or TOML file lists")
    importing.add_argument("file", type=Path, metavar="FILE")
    importing.add_argument("--dry-run", action="store_true", help="validate only")
    importing.set_defaults(handler=_rules_import)

    alerts = commands.add_parser("alerts", help="list and acknowledge alerts")
    alert_verbs = alerts.add_subparsers(dest="verb", required=True, metavar="VERB")
    alert_list = alert_verbs.add_parser("list", help="newest alerts first")
    alert_list.add_argument("--active", action="store_true", help="only alerts not yet resolved")
    alert_list.add_argument("--device", metavar="DEVICE", help=f"one device's alerts ({DEVICE_HELP})")
    alert_list.add_argument("--limit", type=int, default=50)
    alert_list.add_argument("--json", action="store_true")
    alert_list.set_defaults(handler=_alerts_list)
    ack = alert_verbs.add_parser("ack", help="acknowledge an alert")
    ack.add_argument("alert_id", metavar="ALERT_ID")
    ack.add_argument("--by", default=None, help="who acknowledges (kept in the alert)")
    ack.set_defaults(handler=_alerts_ack)
    test = alert_verbs.add_parser("test", help="send a test notification through every channel")
    test.set_defaults(handler=_alerts_test)


def _scope_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--device", metavar="DEVICE", help=f"rules of one device ({DEVICE_HELP})")
    group.add_argument("--group", type=int, metavar="ID", help="rules of a device group")
    group.add_argument("--global", dest="everywhere", action="store_true", help="rules for every device")


async def _scope(admin: RuleAdmin, args: argparse.Namespace) -> Scope | None:
    """The scope the options name; UnknownDevice for a device there is none of."""
    if args.device is not None:
        return Scope("device", await find_device_id(admin.stores.postgres, args.device))
    if args.group is not None:
        return Scope("group", args.group)
    return Scope("global") if args.everywhere else None


def _refuse(command: str, problem: object) -> int:
    print(f"iotflow: {command}: {problem}", file=sys.stderr)
    return ExitCode.FAILURE


def parse_rule_arguments(words: list[str]) -> dict[str, Any]:
    """`{"type": …}` or `type=threshold value=30 …` → a dict; ValueError names the bad word."""
    if len(words) == 1 and words[0].lstrip().startswith("{"):
        try:
            raw = orjson.loads(words[0])
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"RULE is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("RULE must be a JSON object")
        return raw
    raw = {}
    for word in words:
        key, sep, text = word.partition("=")
        if not sep or not key:
            raise ValueError(f"{word!r} is not key=value")
        try:
            raw[key] = orjson.loads(text)
        except orjson.JSONDecodeError:
            raw[key] = text
    return raw


def _run(settings: Settings, work: Any, command: str) -> int:
    async def go() -> int:
        async with open_admin(settings) as admin:
            code: int = await work(admin)
            return code

    try:
        return asyncio.run(go())
    except UnknownDevice as exc:
        return unknown_device(command, exc)


# --- rules -------------------------------------------------------------------------------------------


def _rules_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(admin: RuleAdmin) -> int:
        scope = await _scope(admin, args)
        if args.json:
            from worker.rules.source import ALL, COLLECTION

            if scope is None:
                docs = await admin.documents.find(COLLECTION, limit=ALL)
            else:
                doc = await admin.documents.get(COLLECTION, scope.key)
                docs = [doc] if doc else []
            print(orjson.dumps(docs, option=orjson.OPT_INDENT_2, default=str).decode())
            return ExitCode.OK
        listed = await admin.list_rules(scope)
        for rule in listed.rules:
            state = "" if rule.enabled else "  (disabled)"
            print(f"{rule.uid:40} {rule.kind:9} {rule.severity:8} {describe(rule)}{state}")
        for problem in listed.problems:
            print(f"INVALID {problem}")
        if not listed.rules and not listed.problems:
            print("no rules")
        return ExitCode.OK

    return _run(settings, work, "rules list")


def _rules_set(settings: Settings, args: argparse.Namespace) -> int:
    try:
        raw = parse_rule_arguments(args.rule)
    except ValueError as exc:
        return _refuse("rules set", exc)

    async def work(admin: RuleAdmin) -> int:
        scope = await _scope(admin, args)
        assert scope is not None  # the scope options are required here
        try:
            rule = await admin.set_rule(scope, raw)
        except RuleError as exc:
            return _refuse("rules set", exc)
        print(f"set {rule.uid}: {describe(rule)}")
        return ExitCode.OK

    return _run(settings, work, "rules set")


def _rules_delete(settings: Settings, args: argparse.Namespace) -> int:
    async def work(admin: RuleAdmin) -> int:
        scope = await _scope(admin, args)
        assert scope is not None
        if not await admin.delete_rule(scope, args.rule_id):
            return _refuse("rules delete", f"there is no rule {args.rule_id!r} in {scope.key}")
        print(f"deleted {scope.key}/{args.rule_id}")
        return ExitCode.OK

    return _run(settings, work, "rules delete")


def read_rules_file(path: Path) -> Any:
    """JSON, or TOML (`[[configs]]` tables) when the name ends in .toml."""
    data = path.read_bytes()
    if path.suffix == ".toml":
        return tomllib.loads(data.decode())
    return orjson.loads(data)


def _rules_import(settings: Settings, args: argparse.Namespace) -> int:
    try:
        configs = read_rules_file(args.file)
    except (OSError, ValueError) as exc:  # JSON and TOML decode errors are ValueErrors
        return _refuse("rules import", f"{args.file}: {exc}")

    async def work(admin: RuleAdmin) -> int:
        try:
            rules, scopes = await admin.import_configs(configs, dry_run=args.dry_run)
        except InvalidRules as exc:
            for error in exc.errors:
                print(f"iotflow: rules import: {args.file}: {error}", file=sys.stderr)
            print(f"iotflow: rules import: {len(exc.errors)} problem(s), nothing imported", file=sys.stderr)
            return ExitCode.FAILURE
        verb = "valid:" if args.dry_run else "imported"
        print(f"{verb} {rules} rule(s) in {scopes} scope(s)")
        return ExitCode.OK

    return _run(settings, work, "rules import")


# --- alerts ------------------------------------------------------------------------------------------


def _alerts_list(settings: Settings, args: argparse.Namespace) -> int:
    from worker.rules.alert_admin import list_alerts
    from worker.sinks.notify.outbox import delivery_state

    async def work(admin: RuleAdmin) -> int:
        device = None if args.device is None else await find_device_id(admin.stores.postgres, args.device)
        alerts = await list_alerts(admin.documents, active=args.active, device_id=device, limit=args.limit)
        state = await delivery_state(admin.stores.postgres, [alert["_id"] for alert in alerts])
        for alert in alerts:
            alert["notifications"] = state.get(alert["_id"], [])
        if args.json:
            print(orjson.dumps(alerts, option=orjson.OPT_INDENT_2, default=str).decode())
            return ExitCode.OK
        for alert in alerts:
            ack = "ack" if alert.get("acknowledged") else "-"
            print(
                f"{alert['_id']}  {alert.get('status', '?'):8} {ack:3} {alert.get('severity', '?'):8} "
                f"{alert.get('fired_at', '')}  {alert.get('message', '')}"
            )
            for line in delivery_lines(alert.get("notifications", [])):
                print(f"    {line}")
        if not alerts:
            print("no alerts")
        return ExitCode.OK

    return _run(settings, work, "alerts list")


def _alerts_ack(settings: Settings, args: argparse.Namespace) -> int:
    from worker.rules.alert_admin import acknowledge
    from worker.sinks.alerts import AlertSink
    from worker.sinks.notify.outbox import NotificationOutbox

    async def work(admin: RuleAdmin) -> int:
        # The acknowledgement's webhooks go into the outbox; a running worker sends them.
        notify = settings.notify
        outbox = NotificationOutbox(admin.stores.postgres, notify) if notify.enabled else None
        doc = await acknowledge(admin.documents, AlertSink(admin.stores, outbox), args.alert_id, args.by)
        if doc is None:
            return _refuse("alerts ack", f"there is no alert {args.alert_id!r}")
        print(f"acknowledged {args.alert_id} ({doc.get('status')}): {doc.get('message', '')}")
        return ExitCode.OK

    return _run(settings, work, "alerts ack")


def delivery_lines(notifications: list[dict[str, Any]]) -> list[str]:
    """One line per notification not delivered yet: failing (the last error) or pending."""
    lines = []
    for note in notifications:
        state = f"failing: {note['last_error']}" if note["last_error"] else "pending"
        lines.append(f"notify {note['channel']} {note['event']}: {state} (attempts {note['attempts']})")
    return lines


def _alerts_test(settings: Settings, args: argparse.Namespace) -> int:
    from worker.sinks.notify.probe import send_test

    if not settings.notify.enabled:
        print(
            "iotflow: alerts test: no notification channel configured "
            "(set notify.alertmanager_urls or notify.webhooks)",
            file=sys.stderr,
        )
        return ExitCode.CONFIG
    results = asyncio.run(send_test(settings.notify))
    for channel, error in results:
        print(f"{channel}: {'ok' if error is None else f'failed: {error}'}")
    return ExitCode.OK if all(error is None for _, error in results) else ExitCode.FAILURE
