"""What a command's failure looks like to its user: one line on stderr and an exit code.

`app.run` hands whatever a handler raises to `explain`, so that no handler needs a
try/except of its own for what every command can meet:

    a server unreachable (worker.retry.Unreachable, or a driver's own error)  exit 1, naming it
    a server refusing our credentials, or the database named does not exist  exit 2
    a login or a certificate refused (either way), naming the setting        exit 2
    a PostgreSQL schema not migrated, or behind                               exit 2, "run `iotflow migrate`"

Anything else is a bug: one line too, exit 1, and the traceback only with
`IOTFLOW_LOG_LEVEL=debug` (docs/operations.md, "The command line").
"""

from __future__ import annotations

import asyncpg

from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.retry import SettingRefused, Unreachable, describe, is_transient, refusal
from worker.stores.naming import settings_to_check, store_address

DEBUG_HINT = "run with IOTFLOW_LOG_LEVEL=debug for the traceback"

# SQLSTATE 42P01, 3F000, 42703: what a query meets in a schema `iotflow migrate` has not
# (fully) made, since every connection puts the configured schema on its search path.
_UNMIGRATED_POSTGRES = (
    asyncpg.exceptions.UndefinedTableError,
    asyncpg.exceptions.InvalidSchemaNameError,
    asyncpg.exceptions.UndefinedColumnError,
)


def explain(exc: BaseException, settings: Settings) -> tuple[ExitCode, str] | None:
    """The exit code and the line for a failure a user can meet and fix; None for a bug."""
    from worker.stores.migrate import SchemaNotReady  # here: every command loads this module, few fail

    exc = _single(exc)
    if isinstance(exc, Unreachable):
        return ExitCode.FAILURE, str(exc)
    if isinstance(exc, SchemaNotReady):
        return ExitCode.CONFIG, str(exc)
    refused = refusal(exc)
    if isinstance(refused, SettingRefused):  # its message names the store and the setting
        return ExitCode.CONFIG, str(refused)
    if refused is not None:
        return (
            ExitCode.CONFIG,
            f"{server(refused, settings)} refused us ({describe(refused)}): "
            f"check {settings_to_check(refused)}",
        )
    if isinstance(exc, _UNMIGRATED_POSTGRES):
        return ExitCode.CONFIG, (
            f"PostgreSQL schema {settings.postgres.schema!r} is not migrated or is behind ({exc}): "
            "run `iotflow migrate`"
        )
    if is_transient(exc):
        return ExitCode.FAILURE, f"{server(exc, settings)} is unreachable ({describe(exc)})"
    return None


def unexpected(exc: BaseException) -> str:
    return f"unexpected error: {describe(exc)} ({DEBUG_HINT})"


def server(exc: BaseException, settings: Settings) -> str:
    """Which store an error came from, by its driver, and its configured address."""
    return store_address(exc, settings)


def _single(exc: BaseException) -> BaseException:
    """The one exception a group (a TaskGroup's) holds, to be explained as itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
