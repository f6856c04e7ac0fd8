"""The registry's negative cache stays bounded however many strangers write in."""

from __future__ import annotations

import pytest

from worker.decode import registry


def test_negative_cache_purges_expired_entries_and_caps_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "NEGATIVE_CACHE_MAX", 100)
    cache: dict[str, float] = {}
    for n in range(100):
        registry._remember_unknown(cache, f"old{n}", now=0.0)  # expire at 30.0
    registry._remember_unknown(cache, "new", now=100.0)
    assert list(cache) == ["new"]  # the expired hundred went

    for n in range(99):
        registry._remember_unknown(cache, f"live{n}", now=100.0)
    registry._remember_unknown(cache, "one-too-many", now=100.0)
    assert len(cache) <= 100
