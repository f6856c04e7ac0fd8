"""The parser: each command group registers its sub-commands here; `run` runs one.

A sub-command is a parser plus a handler `(settings, args) -> exit code`
(worker.exit_codes.ExitCode); the handlers import what they need when they run,
so `iotflow rules list` does not load the daemon, nor `iotflow run` the jobs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.cli import certs, check, daemon, devices, jobs, query, rules, tools
from worker.config import ConfigError, Settings, load_settings
from worker.exit_codes import ExitCode
from worker.logging import configure_logging
from worker.runtime.signals import release_stop_signals

Handler = Callable[[Settings, argparse.Namespace], int]

# Commands that take over the stop signals held since start (worker.runtime.signals).
HOLDS_STOP_SIGNALS: frozenset[Handler] = frozenset({daemon.run_daemon_command})

COMMAND_GROUPS: tuple[Callable[[argparse._SubParsersAction[Any]], None], ...] = (
    daemon.add_commands,
    check.add_commands,
    rules.add_commands,
    devices.add_commands,
    jobs.add_commands,
    tools.add_commands,
    certs.add_commands,
    query.add_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iotflow", description="IoTFlow worker")
    parser.add_argument("--config", type=Path, help="TOML settings file (IOTFLOW_* variables win)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in COMMAND_GROUPS:
        add_commands(commands)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse, load the settings, run one command; its exit code (worker.exit_codes)."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    if handler not in HOLDS_STOP_SIGNALS:
        release_stop_signals()
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return config_error(exc)
    configure_logging(settings.log.level, settings.log.format)
    return int(handler(settings, args))


def config_error(problem: object) -> ExitCode:
    """One line on stderr (the journal keeps it), before logging is even configured."""
    line = " ".join(str(problem).split())  # one line, whatever the problem's text holds
    print(f"iotflow: configuration error: {line}", file=sys.stderr)
    return ExitCode.CONFIG
