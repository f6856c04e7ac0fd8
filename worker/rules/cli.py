"""`iotflow rules …` and `iotflow alerts …` (to be written with the rules actor)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register the rules and alerts sub-commands."""
