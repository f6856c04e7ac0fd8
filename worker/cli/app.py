"""The parser: each command group registers its sub-commands here; `run` runs one.

A sub-command is a parser plus a handler `(settings, args) -> exit code`
(worker.exit_codes.ExitCode); the handlers import what they need when they run,
so `iotflow rules list` does not load the daemon, nor `iotflow run` the jobs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import worker
from worker.cli import certs, check, daemon, deadletters, devices, errors, jobs, mappings, query, rules, tools
from worker.cli.times import attach_relative_times
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
    deadletters.add_commands,
    mappings.add_commands,
    jobs.add_commands,
    tools.add_commands,
    certs.add_commands,
    query.add_commands,
)


class CommandParser(argparse.ArgumentParser):
    """Every parser of the tree, each sub-command's included, takes `--config`: before the
    sub-command or after it (where given last, it wins)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--config",
            type=Path,
            default=argparse.SUPPRESS,  # unset here leaves what an outer parser read
            help="TOML settings file (default: $IOTFLOW_CONFIG; IOTFLOW_* variables win)",
        )
        # Which command this is, for its error line: the innermost parser's default wins.
        self.set_defaults(command_name=self.prog)

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(attach_relative_times(words), namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="iotflow", description="IoTFlow worker")
    parser.set_defaults(config=None)
    parser.add_argument("--version", action="version", version=f"%(prog)s {worker.__version__}")
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
    try:
        code = int(handler(settings, args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception as exc:
        explained = errors.explain(exc, settings)
        if explained is None and settings.log.level == "debug":
            raise
        code, line = explained or (ExitCode.FAILURE, errors.unexpected(exc))
        print(f"{args.command_name}: {' '.join(line.split())}", file=sys.stderr)
        return code


def _reader_gone() -> int:
    """Whoever read stdout closed it (`iotflow config | head -1`): they have what they wanted,
    so exit 0 in silence. What is still buffered goes to /dev/null, or Python's own flush at
    exit would fail on the closed pipe again (the recipe of Python's signal module docs)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return ExitCode.OK


def config_error(problem: object) -> ExitCode:
    """One line on stderr (the journal keeps it), before logging is even configured."""
    line = " ".join(str(problem).split())  # one line, whatever the problem's text holds
    print(f"iotflow: configuration error: {line}", file=sys.stderr)
    return ExitCode.CONFIG


def decode_files_error(settings: Settings) -> ExitCode | None:
    """The codec and mapping files the daemon would decode with, read now: a broken one is
    `config_error`'s line and exit 2, before any store is reached."""
    from worker.decode.codecs import CodecConfigError, load_codecs
    from worker.decode.mappings import MappingConfigError, load_mappings

    try:
        load_codecs(Path(settings.pipeline.codecs) if settings.pipeline.codecs else None)
    except CodecConfigError as exc:
        return config_error(f"pipeline.codecs: {exc}")
    try:
        load_mappings(settings.decode.profiles, settings.decode.mappings)
    except MappingConfigError as exc:
        return config_error(exc)
    return None
