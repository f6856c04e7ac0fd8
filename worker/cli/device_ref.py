"""A device on the command line: a device id, a device_key or a MAC, in every command.

Each command that takes a device finds it with `worker.stores.devices.find_device`
and answers an unknown one the same way: one line, exit 2.
"""

from __future__ import annotations

import sys

from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.stores.devices import UnknownDevice, find_device_id

DEVICE_HELP = "a device id, device_key or MAC"


def unknown_device(command: str, exc: UnknownDevice) -> ExitCode:
    print(f"iotflow: {command}: {exc}", file=sys.stderr)
    return ExitCode.CONFIG


async def device_id(settings: Settings, ref: str) -> int:
    """The id of the device `ref` names, on a connection of its own (for commands that
    open no stores); UnknownDevice when there is none."""
    from worker.stores.postgres import connect

    conn = await connect(settings.postgres)
    try:
        return await find_device_id(conn, ref)
    finally:
        await conn.close()
