"""The Cassandra time-series backend without a Cassandra server: settings, CQL, partition
grouping, the driver's futures bridged to asyncio, and outages seen through the real driver
(a port that refuses, a socket that accepts and never answers). With a server:
tests/test_cassandra_integration.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from jobs.cassandra_rollups import aggregate, combine
from schemas.records import DecodedBatch, Reading, TextReading
from worker.config import CassandraSettings, ConfigError, Settings, load_settings
from worker.decode.parse import Limits, parse_message
from worker.retry import Backoff, is_transient, retry_transient
from worker.sinks.cassandra import CassandraTimeseriesWriter, bind, insert_statements, plan_writes
from worker.stores.cassandra import CassandraStore, bridge, build_cluster
from worker.stores.cassandra_schema import keyspace_statement, replication_map, table_statements
from worker.stores.timeseries import cassandra_range_query

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


# --- settings ------------------------------------------------------------------------------------------


def test_the_backend_and_the_hosts_come_from_the_spec_variables() -> None:
    settings = load_settings(
        environ={
            "IOTFLOW_TIMESERIES_BACKEND": "both",
            "IOTFLOW_CASSANDRA_HOSTS": "cass-1, cass-2,cass-3",
            "IOTFLOW_CASSANDRA_REPLICATION": "dc1:3,dc2:2",
            "IOTFLOW_CASSANDRA_CONSISTENCY": "local_one",
        }
    )
    assert settings.timeseries.backend == "both"
    assert settings.timeseries.uses_cassandra and settings.timeseries.uses_postgres
    assert settings.cassandra.hosts == ["cass-1", "cass-2", "cass-3"]
    assert replication_map(settings.cassandra.replication) == {
        "class": "NetworkTopologyStrategy",
        "dc1": "3",
        "dc2": "2",
    }


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("IOTFLOW_TIMESERIES_BACKEND", "scylla", "timeseries.backend"),
        ("IOTFLOW_CASSANDRA_REPLICATION", "dc1", "cassandra.replication"),
        ("IOTFLOW_CASSANDRA_REPLICATION", "0", "cassandra.replication"),
        ("IOTFLOW_CASSANDRA_HOSTS", "cass-1:9042", "cassandra.hosts"),
        ("IOTFLOW_CASSANDRA_CONSISTENCY", "serial", "cassandra.consistency"),
        ("IOTFLOW_CASSANDRA_BATCH_ROWS", "0", "cassandra.batch_rows"),
    ],
)
def test_a_bad_cassandra_setting_names_itself(variable: str, value: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"IOTFLOW_TIMESERIES_BACKEND": "cassandra", variable: value})
    assert caught.value.setting.startswith(named)


def test_a_bad_cassandra_setting_exits_2_with_one_line() -> None:
    env = {"IOTFLOW_TIMESERIES_BACKEND": "cassandra", "IOTFLOW_CASSANDRA_REPLICATION": "dc1:x", "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "cassandra.replication" in result.stderr and "dc1:3,dc2:3" in result.stderr


# --- CQL ----------------------------------------------------------------------------------------------


def test_migrate_creates_the_keyspace_with_the_configured_replication() -> None:
    simple = keyspace_statement(CassandraSettings(keyspace="telemetry", replication="3"))
    assert simple == (
        "CREATE KEYSPACE IF NOT EXISTS telemetry WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': '3'}"
    )
    multi = keyspace_statement(CassandraSettings(keyspace="telemetry", replication="dc1:3,dc2:2"))
    assert "{'class': 'NetworkTopologyStrategy', 'dc1': '3', 'dc2': '2'}" in multi


def test_the_three_tables_have_the_spec_keys_ttl_and_time_window_compaction() -> None:
    statements = table_statements(CassandraSettings(keyspace="ks1", default_ttl_s=7776000))
    creates = [s for s in statements if s.startswith("CREATE TABLE IF NOT EXISTS")]
    assert [s.split()[5] for s in creates] == ["ks1.device_data", "ks1.user_data", "ks1.aggregated_data"]
    device, user, aggregated = creates
    assert "PRIMARY KEY ((device_id), timestamp, measurement_name)" in device
    assert "text_value text" in device and "numeric_value double" in device
    assert "PRIMARY KEY ((user_id), timestamp, device_id, measurement_name)" in user
    assert "PRIMARY KEY ((device_id, measurement_name), time_bucket, aggregation_type)" in aggregated
    assert all("CLUSTERING ORDER BY (time" in s for s in creates)
    alters = [s for s in statements if s.startswith("ALTER TABLE")]
    assert len(alters) == 3 and all("TimeWindowCompactionStrategy" in s for s in alters)
    assert sum("default_time_to_live = 7776000" in s for s in alters) == 2  # raw tables only
    assert not any("$" in s or "--" in s for s in statements)


def test_statements_name_their_keyspace_and_bind_every_value() -> None:
    cql = insert_statements("ks1")
    assert cql["numeric"].startswith("INSERT INTO ks1.device_data (device_id, timestamp, measurement_name, ")
    assert "numeric_value) VALUES (?, ?, ?, ?)" in cql["numeric"]
    assert "text_value) VALUES (?, ?, ?, ?)" in cql["text"]
    assert cql["user"].startswith("INSERT INTO ks1.user_data (user_id, timestamp, device_id, ")
    assert "ALLOW FILTERING" not in cassandra_range_query("ks1", by_measurement=False)
    assert cassandra_range_query("ks1", by_measurement=True).endswith(
        "AND measurement_name = ? ALLOW FILTERING"
    )


# --- partition grouping ------------------------------------------------------------------------------


def _batch() -> DecodedBatch:
    readings = [Reading(T0 + timedelta(seconds=i), 1, 10, float(i), "temperature") for i in range(7)]
    readings += [Reading(T0, 2, 20, 5.0, "humidity"), Reading(T0, 3, 30, 1.0, "pressure")]
    texts = [TextReading(T0, 1, 11, "open", "door"), TextReading(T0, 3, 31, "true", "alarm")]
    # Devices 1 and 2 belong to user 100; device 3 has no user.
    return DecodedBatch(readings=readings, texts=texts, device_users={1: 100, 2: 100, 3: None})


def test_rows_are_grouped_by_partition_and_chunked() -> None:
    writes = plan_writes(_batch(), batch_rows=3)
    # Every request holds one partition of one table, never more than batch_rows rows.
    assert all(len(w.rows) <= 3 for w in writes)
    for w in writes:
        key_column = w.rows[0][0]
        assert all(row[0] == key_column == w.partition for row in w.rows)
    by_group: dict[tuple[str, int], int] = {}
    for w in writes:
        by_group[(w.kind, w.partition)] = by_group.get((w.kind, w.partition), 0) + len(w.rows)
    assert by_group == {
        ("numeric", 1): 7,
        ("numeric", 2): 1,
        ("numeric", 3): 1,
        ("user", 100): 8,  # devices 1 and 2 share user 100's partition; device 3 has no user
        ("text", 1): 1,
        ("text", 3): 1,
    }
    assert [len(w.rows) for w in writes if (w.kind, w.partition) == ("numeric", 1)] == [3, 3, 1]


def test_rows_carry_the_values_in_statement_order() -> None:
    writes = plan_writes(_batch(), batch_rows=50)
    first = {(w.kind, w.partition): w.rows[0] for w in writes}
    assert first[("numeric", 2)] == (2, T0, "humidity", 5.0)
    assert first[("user", 100)] == (100, T0, 1, "temperature", 0.0)
    assert first[("text", 3)] == (3, T0, "alarm", "true")
    assert plan_writes(DecodedBatch(), batch_rows=50) == []


def _prepared(kind: str) -> Any:
    """The PreparedStatement a server would return for `kind`'s insert: the driver's own class,
    with the bind metadata a Cassandra reports for these columns (partition key first)."""
    from cassandra.cqltypes import DateType, DoubleType, Int32Type, UTF8Type
    from cassandra.protocol import ColumnMetadata
    from cassandra.query import PreparedStatement

    columns = {
        "numeric": (
            "device_data",
            [
                ("device_id", Int32Type),
                ("timestamp", DateType),
                ("measurement_name", UTF8Type),
                ("numeric_value", DoubleType),
            ],
        ),
        "text": (
            "device_data",
            [
                ("device_id", Int32Type),
                ("timestamp", DateType),
                ("measurement_name", UTF8Type),
                ("text_value", UTF8Type),
            ],
        ),
        "user": (
            "user_data",
            [
                ("user_id", Int32Type),
                ("timestamp", DateType),
                ("device_id", Int32Type),
                ("measurement_name", UTF8Type),
                ("numeric_value", DoubleType),
            ],
        ),
    }
    table, cols = columns[kind]
    metadata = [ColumnMetadata("ks1", table, name, kind_) for name, kind_ in cols]
    return PreparedStatement(metadata, b"id", [0], insert_statements("ks1")[kind], "ks1", 4, None, None)


def test_a_partition_s_rows_bind_as_one_unlogged_batch_routed_by_its_key() -> None:
    from cassandra.cqltypes import DateType, Int32Type
    from cassandra.query import BatchStatement, BatchType, BoundStatement

    writes = plan_writes(_batch(), batch_rows=50)
    device_rows = next(w for w in writes if (w.kind, w.partition) == ("numeric", 1))
    batch = bind(device_rows, _prepared("numeric"))
    assert isinstance(batch, BatchStatement) and batch.batch_type == BatchType.UNLOGGED
    assert len(batch) == 7 and batch.is_idempotent
    assert batch.routing_key == Int32Type.serialize(1, 4)  # token-aware: device 1's replicas

    single = next(w for w in writes if (w.kind, w.partition) == ("text", 3))
    bound = bind(single, _prepared("text"))
    assert isinstance(bound, BoundStatement)
    assert bound.routing_key == Int32Type.serialize(3, 4)
    # The driver serialises our values: an aware datetime becomes Cassandra's milliseconds.
    assert DateType.deserialize(bound.values[1], 4) == T0.replace(tzinfo=None)
    assert bound.values[3] == b"true"

    user = next(w for w in writes if w.kind == "user")
    assert bind(user, _prepared("user")).routing_key == Int32Type.serialize(100, 4)


# --- text values -----------------------------------------------------------------------------------------


def test_strings_and_booleans_are_kept_as_text_only_where_a_store_has_a_column() -> None:
    payload = b'{"temperature": 21.5, "door": "open", "alarm": false}'
    kept = parse_message("devices/d1/telemetry", payload, T0.timestamp(), {}, Limits(keep_text=True))
    assert [(r.label, r.value, r.text) for r in kept.readings] == [
        ("temperature", 21.5, None),
        ("door", 0.0, "open"),
        ("alarm", 0.0, "false"),
    ]
    assert not kept.skipped
    skipped = parse_message("devices/d1/telemetry", payload, T0.timestamp(), {}, Limits())
    assert [r.label for r in skipped.readings] == ["temperature"]
    assert skipped.skipped == [
        "door: str value, only numbers are stored",
        "alarm: bool value, only numbers are stored",
    ]
    only_text = parse_message(
        "devices/d1/telemetry", b'{"door": "open"}', T0.timestamp(), {}, Limits(keep_text=True)
    )
    assert [r.text for r in only_text.readings] == ["open"]


# --- rollup arithmetic -----------------------------------------------------------------------------------


def test_hourly_figures_and_a_day_combined_from_its_hours() -> None:
    rows = [("t", 3.0, T0 + timedelta(minutes=50)), ("t", 1.0, T0), ("t", None, T0), ("h", 7.0, T0)]
    series = aggregate(rows)
    assert series["t"].values() == {"count": 2.0, "min": 1.0, "max": 3.0, "sum": 4.0, "avg": 2.0, "last": 3.0}
    assert series["h"].count == 1
    hour = {stat: (value, 2) for stat, value in series["t"].values().items()}
    later = {
        "count": (1.0, 1),
        "min": (0.5, 1),
        "max": (0.5, 1),
        "sum": (0.5, 1),
        "avg": (0.5, 1),
        "last": (0.5, 1),
    }
    half_written = {"count": (9.0, 9), "last": (99.0, 9)}
    day = combine({T0 + timedelta(hours=2): later, T0: hour, T0 + timedelta(hours=3): half_written})
    assert day is not None
    assert (day.count, day.min, day.max, day.sum, day.last) == (3, 0.5, 3.0, 4.5, 0.5)
    assert combine({T0: half_written}) is None


# --- the driver, against sockets that are no Cassandra -----------------------------------------------


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port nothing listens on (bound, then closed: the kernel refuses connections)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield port


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A socket that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


class DriverLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def driver_log() -> Iterator[DriverLog]:
    handler = DriverLog()
    logger = logging.getLogger("cassandra")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def _driver_threads(before: set[threading.Thread]) -> list[str]:
    new = set(threading.enumerate()) - before
    return [t.name for t in new if t.is_alive() and not t.name.startswith("asyncio_")]


async def _until_driver_threads_end(before: set[threading.Thread]) -> list[str]:
    """The driver's libev loop thread (`event_loop`) ends by itself once its last connection
    has closed, a moment after `Cluster.shutdown()` returns: wait for that, a bounded while."""
    deadline = time.monotonic() + 10
    while (left := _driver_threads(before)) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return left


@pytest.fixture(autouse=True)
async def driver_threads_end() -> AsyncIterator[None]:
    before = set(threading.enumerate())
    yield
    assert await _until_driver_threads_end(before) == []


def _settings(port: int) -> CassandraSettings:
    return CassandraSettings(port=port, connect_timeout_s=0.5, request_timeout_s=0.5)


async def test_a_refused_connection_is_an_outage_and_the_writer_retries_it_with_one_line(
    driver_log: DriverLog,
) -> None:
    batch = _batch()
    with refusing_port() as port:
        store = CassandraStore(_settings(port))
        sink = CassandraTimeseriesWriter(store)
        tries = 0

        class Enough(Exception):
            pass

        async def attempt() -> int:
            nonlocal tries
            tries += 1
            if tries > 3:
                raise Enough  # not transient: ends the loop after three real failures
            return await sink.write(batch)

        try:
            with structlog.testing.capture_logs() as logs, pytest.raises(Enough):
                await retry_transient(
                    attempt, "sink", reset=sink.reset, backoff=Backoff(0.01, 0.02), sink="cassandra"
                )
        finally:
            await store.close()
    unavailable = [e for e in logs if e["event"] == "sink.unavailable"]
    assert len(unavailable) == 1 and "NoHostAvailable" in unavailable[0]["error"]
    assert "Connection refused" in unavailable[0]["error"]
    assert tries == 4
    # The driver's own per-attempt lines are dropped: the outage is reported once, above.
    assert [r.getMessage() for r in driver_log.records] == []


async def test_a_server_that_never_answers_times_out_as_an_outage() -> None:
    from cassandra import OperationTimedOut
    from cassandra.cluster import NoHostAvailable

    with black_hole() as port:
        store = CassandraStore(_settings(port))
        try:
            with pytest.raises(NoHostAvailable) as caught:
                await store.ping()
        finally:
            await store.close()
    (error,) = caught.value.errors.values()
    assert isinstance(error, OperationTimedOut)
    assert is_transient(caught.value)


async def test_a_caller_that_stops_waiting_leaves_the_connect_attempt_to_the_others() -> None:
    """A readiness probe's timeout must not cut a connect short for the writer waiting on it too."""
    from cassandra.cluster import NoHostAvailable

    with black_hole() as port:
        store = CassandraStore(_settings(port))
        try:
            probe = asyncio.ensure_future(store.ping())
            writer = asyncio.ensure_future(store.ping())
            await asyncio.sleep(0)
            probe.cancel()
            with pytest.raises(NoHostAvailable):
                await writer  # the one attempt ran to its end: the connect timeout
            assert probe.cancelled()
        finally:
            await store.close()


async def test_a_failed_connect_leaves_no_driver_thread_behind() -> None:
    before = set(threading.enumerate())
    with refusing_port() as port:
        store = CassandraStore(_settings(port))
        with pytest.raises(Exception, match="Unable to connect"):
            await store.ping()
        await store.close()
    assert await _until_driver_threads_end(before) == []


async def test_the_bridge_hands_the_driver_thread_s_result_to_the_loop() -> None:
    """A real ResponseFuture completed from another thread, as the driver's event loop does
    (its `_set_final_*` are what the driver calls when a response or a timeout arrives):
    the awaiting task gets the result or the error, and the loop never blocks on it."""
    from cassandra import OperationTimedOut
    from cassandra.cluster import ResponseFuture
    from cassandra.policies import RoundRobinPolicy
    from cassandra.query import tuple_factory

    def future() -> ResponseFuture:
        # No session: a fixed host stands for the query plan, no timeout for the timer.
        return ResponseFuture(
            None, None, None, None, row_factory=tuple_factory, load_balancer=RoundRobinPolicy(), host="node"
        )

    done = future()
    pending = asyncio.ensure_future(bridge(done))
    await asyncio.sleep(0)
    assert not pending.done()  # waiting without blocking: this line ran
    driver = threading.Thread(target=done._set_final_result, args=([("row",)],))
    driver.start()
    result = await pending
    await asyncio.to_thread(driver.join)
    assert result.current_rows == [("row",)]

    failed = future()
    pending = asyncio.ensure_future(bridge(failed))
    await asyncio.sleep(0)
    driver = threading.Thread(target=failed._set_final_exception, args=(OperationTimedOut("no answer"),))
    driver.start()
    with pytest.raises(OperationTimedOut) as caught:
        await pending
    await asyncio.to_thread(driver.join)
    assert is_transient(caught.value)


def test_the_cluster_is_token_aware_over_the_local_dc_with_the_configured_consistency() -> None:
    from cassandra import ConsistencyLevel
    from cassandra.cluster import EXEC_PROFILE_DEFAULT
    from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

    settings = replace(CassandraSettings(), local_dc="dc2", consistency="each_quorum", request_timeout_s=3.0)
    cluster = build_cluster(settings)
    try:
        profile = cluster.profile_manager.profiles[EXEC_PROFILE_DEFAULT]
        policy = profile.load_balancing_policy
        assert isinstance(policy, TokenAwarePolicy)
        assert isinstance(policy._child_policy, DCAwareRoundRobinPolicy)
        assert policy._child_policy.local_dc == "dc2"
        assert profile.consistency_level == ConsistencyLevel.EACH_QUORUM
        assert profile.request_timeout == 3.0
    finally:
        cluster.shutdown()


def test_settings_without_cassandra_open_no_session() -> None:
    assert not Settings().timeseries.uses_cassandra
