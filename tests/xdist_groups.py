"""Which tests run together when the suite is spread over pytest-xdist workers
(./scripts/test runs `-n 2 --dist loadgroup`).

Each worker is a pytest session of its own, with its own embedded PostgreSQL, Redis and
Mosquitto and its own copy of each session server (Cassandra, Kafka, HiveMQ, FerretDB,
Alertmanager) that one of its tests asks for. So that a server starts on one worker only,
the tests that ask for the same server, or share a module-scoped fixture, form one
`xdist_group`, which xdist runs on one worker; the rest are dealt out test by test. Each
worker stops and restarts only its own servers (the tests that kill Cassandra or Kafka), so
the grouping saves time and never decides a verdict.
"""

from __future__ import annotations

import os

import pytest

# Session fixtures that start their server through request.getfixturevalue, so the
# server's fixture is not among the test's fixture names.
_INDIRECT = {
    "cassandra_hosts": "cassandra_server",
    "kafka_bootstrap": "kafka_server",
    "mongodb_url": "ferretdb_server",
}
# A test parametrized over the MQTT brokers (`mqtt_url`, test_intake's `broker`) names
# HiveMQ by this value and asks for hivemq_server when it runs.
_BY_PARAM = {"hivemq": "hivemq_server"}
# Given these, the workers share one broker, where a daemon of one worker would take the
# messages another worker's test publishes (every daemon subscribes to the default topics).
_SHARED_BROKERS = ("IOTFLOW_TEST_MQTT_URL", "IOTFLOW_TEST_HIVEMQ_URL")


def _needs(item: pytest.Item) -> set[str]:
    """What a test shares with others: the session servers it asks for (their fixtures are
    named `*_server`), and what its file declares it shares (`pytestmark =
    pytest.mark.shares("name")`: a module-scoped fixture that another worker would build again)."""
    found = {str(mark.args[0]) for mark in item.iter_markers("shares") if mark.args}
    for name in getattr(item, "fixturenames", ()):
        if name in _INDIRECT:
            found.add(_INDIRECT[name])
        elif name.endswith("_server"):
            found.add(name)
    callspec = getattr(item, "callspec", None)
    for value in callspec.params.values() if callspec else ():
        if isinstance(value, str) and value in _BY_PARAM:
            found.add(_BY_PARAM[value])
    return found


def groups(items: list[pytest.Item]) -> dict[str, str]:
    """Node id -> group name, for the tests that share something: those that share anything
    (even through a third test) are one group, named after the first of its members."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    needs = {item.nodeid: sorted(_needs(item)) for item in items}
    for keys in needs.values():
        for key in keys:
            parent[root(key)] = root(keys[0])
    members: dict[str, list[str]] = {}
    for key in parent:
        members.setdefault(root(key), []).append(key)
    names = {top: min(keys) for top, keys in members.items()}
    return {nodeid: names[root(keys[0])] for nodeid, keys in needs.items() if keys}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test's group as its closest xdist_group mark, before xdist's own hook reads it
    (pytest-xdist 3.8 reads no mark under pytest 9.2's structured node ids:
    https://github.com/pytest-dev/pytest-xdist/issues/1386; pyproject.toml keeps pytest
    below 9.2 for that)."""
    if not config.getoption("loadgroup", default=False):  # set on xdist's workers only
        return
    if any(os.environ.get(name) for name in _SHARED_BROKERS):
        chosen = dict.fromkeys((item.nodeid for item in items), "shared-broker")
    else:
        chosen = groups(items)
    for item in items:
        if item.nodeid in chosen:
            item.add_marker(pytest.mark.xdist_group(chosen[item.nodeid]))
