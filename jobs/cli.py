"""`iotflow jobs …` and `iotflow report …` (to be written with the arq jobs)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register the jobs and report sub-commands."""
