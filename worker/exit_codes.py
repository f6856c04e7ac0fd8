"""The exit codes of every `iotflow` command (docs/operations.md has the table)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # The command could not do what was asked: the daemon spent its restart budget or
    # overran its shutdown timeout; an admin command was refused (no such rule, device,
    # alert; a job already queued); a command found a server unreachable; an unexpected
    # error (worker/cli/errors.py). systemd restarts the daemon on it.
    FAILURE = 1
    # The configuration, the command line or the schema is wrong, a server refuses our
    # credentials, the HTTP port is taken: nothing a restart would fix, so units say
    # `RestartPreventExitStatus=2`. argparse uses 2 as well.
    CONFIG = 2
    # A command other than `run` (which stops gracefully) ended by Ctrl-C: 128 + SIGINT, as
    # a shell reports a process the signal killed, without the traceback.
    INTERRUPTED = 130
