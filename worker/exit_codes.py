"""The exit codes of every `iotflow` command (docs/operations.md has the table)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # The command could not do what was asked: the daemon spent its restart budget or
    # overran its shutdown timeout; an admin command was refused (no such rule, device,
    # alert; a job already queued). systemd restarts the daemon on it.
    FAILURE = 1
    # The configuration, the command line or the schema is wrong: nothing a restart
    # would fix, so units say `RestartPreventExitStatus=2`. argparse uses 2 as well.
    CONFIG = 2
