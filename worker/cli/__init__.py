"""The `iotflow` command: one parser, every sub-command, one table of exit codes.

app.py     the parser, settings, logging, and the registry of command groups
daemon.py  run, migrate, config
check.py   check
rules.py   rules …, alerts …
devices.py devices meta set|get, devices near
jobs.py    jobs …, report …
tools.py   simulate, demo, bench
query.py   query device
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    # First, before the imports: a stop signal from here on is held for the daemon.
    from worker.runtime.signals import hold_stop_signals

    hold_stop_signals()
    from worker.cli.app import run

    return run(argv)


__all__ = ["main"]
