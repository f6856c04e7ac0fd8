"""Plausible value ranges: a codec field's `min`/`max` or a datapoint's `min_value`/`max_value`.

A reading outside its range comes from a broken sensor or a corrupt payload, not
from the world (6553.5 °C, 1e308 V): it is dead-lettered, never stored.
"""

from __future__ import annotations

from typing import NamedTuple


class ValueRange(NamedTuple):
    """Inclusive bounds; None leaves that side open."""

    low: float | None
    high: float | None

    def contains(self, value: float) -> bool:
        # Written so that NaN is outside every range: each comparison with it is false.
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        low = "-inf" if self.low is None else format_number(self.low)
        high = "inf" if self.high is None else format_number(self.high)
        return f"[{low}, {high}]"


def format_number(value: float) -> str:
    """The shortest text that reads back as `value`: `300`, `4.5`, `1e+308`, `5e-324`."""
    text = repr(float(value))
    return text.removesuffix(".0")
