"""One stream, one format: library records (stdlib `logging`) and the app's structlog events
come out alike, tracebacks only at debug, a library's repeats rate-limited."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import ssl
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
import uvloop

from worker.logging import (
    RATE_LIMIT_WINDOW_S,
    RateLimitFilter,
    configure_logging,
    quiet_abandoned_connection_failures,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Output:
    def __init__(self, level: str = "info", fmt: str = "json") -> None:
        self.stream = io.StringIO()
        self.clock = Clock()
        configure_logging(level, fmt, stream=self.stream, clock=self.clock)

    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.text().splitlines()]


@pytest.fixture(autouse=True)
def keep_session_logging() -> Iterator[None]:
    """Each test configures logging onto its own stream; the session's comes back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


def raise_value_error() -> None:
    raise ValueError("bad value")


def test_a_library_warning_is_one_json_line_like_the_apps_own() -> None:
    out = Output("info")
    logging.getLogger("asyncpg.pool").warning("connection %s was lost", "c1")
    structlog.get_logger("worker.writer").info("batch.committed", rows=3)
    library, app = out.lines()
    assert library["logger"] == "asyncpg.pool"
    assert library["level"] == "warning"
    assert library["event"] == "connection c1 was lost"
    assert library["timestamp"].endswith("Z")
    assert app == {**app, "event": "batch.committed", "level": "info", "logger": "worker.writer", "rows": 3}
    assert set(library) == set(app) - {"rows"}
    assert len(out.text().splitlines()) == 2


def test_library_loggers_speak_from_warning_and_from_debug_at_debug() -> None:
    out = Output("info")
    logging.getLogger("aiomqtt").info("connected")
    logging.getLogger("arq.worker").debug("polling")
    structlog.get_logger("worker.intake").info("mqtt.subscribed")  # the app's level is its own
    assert [line["event"] for line in out.lines()] == ["mqtt.subscribed"]

    out = Output("debug")
    logging.getLogger("aiomqtt").info("connected")
    logging.getLogger("arq.worker").debug("polling")
    assert [(line["logger"], line["level"]) for line in out.lines()] == [
        ("aiomqtt", "info"),
        ("arq.worker", "debug"),
    ]


def test_a_library_exception_is_fields_without_a_traceback_at_info() -> None:
    out = Output("info")
    try:
        raise_value_error()
    except ValueError:
        logging.getLogger("cassandra.cluster").error("control connection failed", exc_info=True)
    [line] = out.lines()
    assert line["event"] == "control connection failed"
    assert line["error_type"] == "ValueError"
    assert line["error"] == "bad value"
    assert "exception" not in line and "exc_info" not in line
    assert "Traceback" not in out.text()
    assert out.text().count("\n") == 1


def test_a_library_exception_keeps_its_traceback_at_debug() -> None:
    out = Output("debug")
    try:
        raise_value_error()
    except ValueError:
        logging.getLogger("aiokafka").exception("fetch failed")
    [line] = out.lines()  # the traceback is one JSON string: still one line
    assert line["error_type"] == "ValueError"
    assert line["exception"].startswith("Traceback (most recent call last)")
    assert "raise_value_error" in line["exception"]
    assert line["exception"].rstrip().endswith("ValueError: bad value")


def test_the_apps_exc_info_follows_the_same_rule() -> None:
    log = structlog.get_logger("jobs")
    out = Output("info")
    try:
        raise_value_error()
    except ValueError as exc:
        log.error("jobs.failed", exc_info=True)
        log.error("actor.crashed", error=repr(exc), exc_info=exc)
    failed, crashed = out.lines()
    assert (failed["error_type"], failed["error"]) == ("ValueError", "bad value")
    assert (crashed["error_type"], crashed["error"]) == ("ValueError", "ValueError('bad value')")
    assert "exception" not in failed and "Traceback" not in out.text()

    out = Output("debug")
    try:
        raise_value_error()
    except ValueError:
        log.error("jobs.failed", exc_info=True)
    [line] = out.lines()
    assert line["error_type"] == "ValueError"
    assert "Traceback (most recent call last)" in line["exception"]


def test_a_console_line_has_no_traceback_at_info() -> None:
    out = Output("info", fmt="console")
    try:
        raise_value_error()
    except ValueError:
        logging.getLogger("asyncpg").warning("terminating a connection", exc_info=True)
    [line] = out.text().splitlines()
    assert "terminating a connection" in line
    assert "asyncpg" in line and "error_type" in line and "ValueError" in line


def test_a_librarys_repeats_print_once_per_window_and_the_next_line_counts_them() -> None:
    out = Output("info")
    pool = logging.getLogger("asyncpg.pool")
    for i in range(100):
        pool.warning("connection %d was lost", i)
        out.clock.now += 0.01  # 1 s for all hundred: inside the window
    [first] = out.lines()
    assert first["event"] == "connection 0 was lost"
    assert "suppressed" not in first

    out.clock.now = 1000.0 + RATE_LIMIT_WINDOW_S
    pool.warning("connection %d was lost", 100)
    pool.warning("connection %d was lost", 101)  # a new window: held back again
    later = out.lines()[1:]
    assert [(line["event"], line.get("suppressed")) for line in later] == [("connection 100 was lost", 99)]

    out.clock.now += 2 * RATE_LIMIT_WINDOW_S
    pool.warning("connection %d was lost", 102)
    assert out.lines()[-1]["suppressed"] == 1

    out.clock.now += 2 * RATE_LIMIT_WINDOW_S
    pool.warning("connection %d was lost", 103)
    assert "suppressed" not in out.lines()[-1]


def test_the_limit_is_per_logger_and_template_and_spares_the_app() -> None:
    out = Output("info")
    for _ in range(3):
        logging.getLogger("asyncpg.pool").warning("connection lost")
        logging.getLogger("asyncpg.pool").warning("pool closing")
        logging.getLogger("aiomqtt").warning("connection lost")
        structlog.get_logger("worker.writer").warning("sink.unavailable", sink="redis")
    events = [(line["logger"], line["event"]) for line in out.lines()]
    assert events == [
        ("asyncpg.pool", "connection lost"),
        ("asyncpg.pool", "pool closing"),
        ("aiomqtt", "connection lost"),
        ("worker.writer", "sink.unavailable"),
        ("worker.writer", "sink.unavailable"),
        ("worker.writer", "sink.unavailable"),
    ]


def test_the_limiter_forgets_the_stalest_templates_first() -> None:
    clock = Clock()
    limiter = RateLimitFilter(window_s=10, clock=clock, max_keys=2)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("lib", logging.WARNING, __file__, 1, msg, None, None)

    assert [limiter.filter(record(m)) for m in ("a", "b", "a", "c")] == [True, True, False, True]
    # Three templates, room for two: "a" (let through longest ago) was forgotten, so it passes.
    assert limiter.filter(record("a"))
    assert not limiter.filter(record("c"))


def test_reconfiguring_replaces_the_handler() -> None:
    first = Output("info")
    second = Output("info")
    logging.getLogger("asyncpg").warning("once")
    assert first.text() == ""
    assert [line["event"] for line in second.lines()] == ["once"]


def test_under_uvloop_a_connection_failure_nobody_retrieved_is_not_an_error_line() -> None:
    out = Output("debug")
    loop = uvloop.new_event_loop()
    try:
        quiet_abandoned_connection_failures(loop)
        failed = loop.create_future()  # as uvloop#437 leaves a TLS handshake's failure
        failed.set_exception(ssl.SSLCertVerificationError(1, "certificate verify failed"))
        del failed
        gc.collect()  # asyncio reports an unretrieved exception when the future goes
        # Other reports still reach asyncio's own handler, an OSError's too.
        loop.call_exception_handler({"message": "Fatal error on transport", "exception": OSError(5, "EIO")})
        loop.call_exception_handler({"message": "Exception in callback", "exception": ValueError("a bug")})
    finally:
        loop.close()
    seen = [(line["event"], line["level"]) for line in out.lines()]
    assert seen == [
        ("asyncio.unretrieved_connection_failure", "debug"),
        ("Fatal error on transport", "error"),
        ("Exception in callback", "error"),
    ]
    assert "certificate verify failed" in out.lines()[0]["error"]


def test_the_stdlib_loop_keeps_asyncio_s_own_handler() -> None:
    loop = asyncio.new_event_loop()
    try:
        quiet_abandoned_connection_failures(loop)
        assert loop.get_exception_handler() is None
    finally:
        loop.close()
