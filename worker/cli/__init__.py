"""The `iotflow` command: one parser, every sub-command, one table of exit codes.

app.py     the parser, settings, logging, and the registry of command groups
errors.py  what a failure looks like: one line on stderr and its exit code
times.py   the times a command line takes: now, -24h, ISO-8601
daemon.py  run, migrate, config
check.py   check
rules.py   rules …, alerts …
devices.py devices add|import|list|show|remove, devices meta set|get, devices near
           (device_csv.py reads the import file; device_ref.py: a device argument in any command)
deadletters.py  deadletters list|show|replay|purge
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
