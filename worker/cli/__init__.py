"""The `iotflow` command: one parser, every sub-command, one table of exit codes.

main.py    the parser, settings, logging, and the registry of command groups
daemon.py  run, migrate, config
rules.py   rules …, alerts …
jobs.py    jobs …, report …
tools.py   simulate, demo, bench
"""

from worker.cli.app import main

__all__ = ["main"]
