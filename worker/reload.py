"""What SIGHUP may change in a running daemon, and what it may not.

A reload reads the settings again (the same file and environment as at start) and
compares them with the running ones. The log level, the codec file (`pipeline.codecs`) and
the mappings (`decode.profiles`, `decode.mappings`), files read again even when their names
did not change, take effect at once (a mapping's new topic filter waits for a restart, which
subscribes to it); device metadata —
a datapoint's plausible range above all — is read afresh from PostgreSQL, since the
caches are dropped. Rules need no signal: they reload on their own (docs/rules.md).
Anything else that differs (a store's URL, a mailbox size, …) is held by connections
and actors built at start: the daemon names it and goes on with the running value
until it is restarted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from worker.config import Settings

# Settings a reload applies; every other difference wants a restart.
RELOADABLE = frozenset({"log.level", "pipeline.codecs", "decode.profiles", "decode.mappings"})


def flatten(settings: Settings) -> dict[str, Any]:
    """`section.name` → value, for every setting."""
    return {
        f"{section}.{name}": value
        for section, table in dataclasses.asdict(settings).items()
        for name, value in table.items()
    }


def changed_settings(running: Settings, loaded: Settings) -> list[str]:
    """The names of the settings whose value differs, sorted."""
    old, new = flatten(running), flatten(loaded)
    return sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))


def needs_restart(changed: list[str]) -> list[str]:
    return [name for name in changed if name not in RELOADABLE]


def apply_reloadable(running: Settings, loaded: Settings) -> None:
    """Copy the reloadable settings into the running ones (shared by every stage, so the
    next incarnation of the pipeline after a crash is built with them too)."""
    running.log = dataclasses.replace(running.log, level=loaded.log.level)
    running.pipeline = dataclasses.replace(running.pipeline, codecs=loaded.pipeline.codecs)
    running.decode = dataclasses.replace(loaded.decode)
