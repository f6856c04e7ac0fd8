"""Logging configuration: one stream of lines, JSON via orjson off a TTY, console on one.

Both kinds of line go through one `logging.StreamHandler` on the root logger, whose
`structlog.stdlib.ProcessorFormatter` renders them alike:

* the app's own events (`structlog.get_logger(...)`), filtered by structlog at the
  configured level;
* records from libraries that use the standard `logging` module (asyncpg, asyncio,
  arq, aiokafka, cassandra-driver) and Python warnings, at WARNING (DEBUG when the
  configured level is debug). They carry `logger`, `level`, `event` like the app's lines,
  and the same (logger, message template) prints at most once per
  `RATE_LIMIT_WINDOW_S`: the next line that gets through says how many were held back
  (`suppressed`).

No line carries a multi-line traceback unless the level is debug: an exception becomes
`error_type` and `error` fields (the app's own `error=...` wins over the latter).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import orjson
import structlog
from structlog.types import EventDict, Processor

# A library's repeated message (same logger, same template) prints once per this many seconds.
RATE_LIMIT_WINDOW_S = 10.0
# (logger, template) pairs remembered; past this the ones seen longest ago are forgotten.
RATE_LIMIT_MAX_KEYS = 1024


def _orjson_dumps(event: Any, default: Any) -> str:
    return orjson.dumps(event, default=default).decode()


def _from_structlog(record: logging.LogRecord) -> bool:
    # ProcessorFormatter.wrap_for_formatter passes these as `extra`.
    return hasattr(record, "_logger") and hasattr(record, "_name")


class RateLimitFilter(logging.Filter):
    """At most one record per (logger name, message template) per `window_s`.

    A record that gets through after others were held back carries their count as
    `record.suppressed`. Records from structlog (the app's events) always pass: the app
    decides itself how often it speaks. `clock` is injectable for tests.
    """

    def __init__(
        self,
        window_s: float = RATE_LIMIT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = RATE_LIMIT_MAX_KEYS,
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self.max_keys = max_keys
        # key -> [time of the last record let through, records held back since]; kept in the
        # order of the last record let through, so the stalest entries are at the front.
        self._seen: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()  # handlers filter outside their own lock (driver threads)

    def filter(self, record: logging.LogRecord) -> bool:
        if _from_structlog(record):
            return True
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        key = (record.name, msg)
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.window_s:
                entry[1] += 1
                return False
            if entry is not None:
                del self._seen[key]
                if entry[1]:
                    record.__dict__["suppressed"] = int(entry[1])
            self._seen[key] = [now, 0]
            self._forget(now)
        return True

    def _forget(self, now: float) -> None:
        seen = self._seen
        while seen:
            oldest = next(iter(seen))
            if len(seen) <= self.max_keys and now - seen[oldest][0] < self.window_s:
                break
            del seen[oldest]


def _add_suppressed(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    suppressed = getattr(record, "suppressed", None)
    if suppressed:
        event_dict["suppressed"] = suppressed
    return event_dict


def _exception_info(value: Any) -> BaseException | None:
    if value is True:
        value = sys.exc_info()
    if isinstance(value, tuple):
        value = value[1] if len(value) > 1 else None
    return value if isinstance(value, BaseException) else None


class _ExceptionFields:
    """`exc_info` → `error_type` and `error`; the traceback stays only when `keep_trace`."""

    def __init__(self, keep_trace: bool) -> None:
        self.keep_trace = keep_trace

    def __call__(self, logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        exc = _exception_info(event_dict.get("exc_info"))
        if exc is None:
            event_dict.pop("exc_info", None)
        else:
            event_dict.setdefault("error_type", type(exc).__name__)
            event_dict.setdefault("error", str(exc))
            if not self.keep_trace:
                del event_dict["exc_info"]
        if not self.keep_trace:
            event_dict.pop("stack_info", None)
            event_dict.pop("stack", None)
        return event_dict


class _AppLoggers:
    """structlog's logger factory: stdlib loggers that hand their records to the root
    logger's handler but stand outside `logging`'s tree of names, so the root's (library)
    level never filters the app's events. structlog has filtered those already."""

    def __init__(self) -> None:
        self._loggers: dict[str, logging.Logger] = {}

    def __call__(self, *args: Any) -> logging.Logger:
        name = str(args[0]) if args else "iotflow"
        logger = self._loggers.get(name)
        if logger is None:
            logger = logging.Logger(name, logging.DEBUG)
            logger.parent = logging.getLogger()
            self._loggers[name] = logger
        return logger


class _Handler(logging.StreamHandler[IO[str]]):
    """The one handler `configure_logging` owns on the root logger (and replaces)."""


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    stream: IO[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Configure logging once for the process; later calls replace the configuration.

    `stream` defaults to `sys.stdout` as it is now; `clock` drives the rate limit (tests).
    """
    out = stream if stream is not None else sys.stdout
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    debug = level.lower() == "debug"
    app_level = logging.getLevelName(level.upper())
    if not isinstance(app_level, int):
        app_level = logging.INFO
    library_level = logging.DEBUG if debug else max(logging.WARNING, app_level)

    renderer: Processor
    trace: list[Processor] = []
    if use_console:
        renderer = structlog.dev.ConsoleRenderer()  # renders a kept exc_info itself
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if debug:
            trace = [structlog.processors.format_exc_info]  # the traceback as one JSON string
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _ExceptionFields(keep_trace=debug),
        *trace,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(app_level),
        logger_factory=_AppLoggers(),
        cache_logger_on_first_use=False,
    )

    handler = _Handler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[_add_suppressed, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.addFilter(RateLimitFilter(clock=clock))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(library_level)
    # Python's warnings (DeprecationWarning …) become `py.warnings` records, not stderr text.
    logging.captureWarnings(True)


def quiet_abandoned_connection_failures(loop: asyncio.AbstractEventLoop) -> None:
    """Under uvloop, report a failed connection attempt that nobody was left to hear of at
    debug, and everything else as asyncio would.

    uvloop's create_connection can leave the failure of a TLS handshake unretrieved when the
    attempt is given up on as it fails (MagicStack/uvloop#437, open): asyncio then logs
    "Future exception was never retrieved" at error, a second line beside the store's own
    report of the same failure (a refused certificate, a lost server). Other reports are
    left to asyncio; the stdlib loop does not have this bug, so nothing changes there.
    """
    if not type(loop).__module__.startswith("uvloop"):
        return

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        failure = context.get("exception")
        if isinstance(failure, OSError) and "never retrieved" in str(context.get("message", "")):
            structlog.get_logger("worker.logging").debug(
                "asyncio.unretrieved_connection_failure", error=f"{type(failure).__name__}: {failure}"
            )
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
