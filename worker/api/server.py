"""The daemon's HTTP server: an aiohttp application run in the daemon's own event loop.

aiohttp rather than Starlette on uvicorn (docs/api.md has the comparison): its runner
starts and stops inside a loop it does not own, installs no signal handlers of its own
(the supervisor's stay in charge), raises a bind failure as OSError (the daemon turns it
into one line and exit 2) where uvicorn calls sys.exit, and uses less CPU per request."""

from __future__ import annotations

import logging

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from worker.config import HttpSettings

log = structlog.get_logger("worker.http")

# Stopping: requests in progress get this long to finish before they are cancelled.
SHUTDOWN_TIMEOUT_S = 5.0
# The largest request body read; a larger one is answered 413 before it is read.
MAX_BODY_BYTES = 256 * 1024


class _BadRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a client's bad bytes, answered 400) as an
    error with a traceback; it is the client's, so it is one info line saying what was wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            record.levelno, record.levelname = logging.INFO, "INFO"
            remote = record.getMessage().rpartition(" from ")[2]
            reason = " ".join(exc.message.split())
            record.msg, record.args = "http.bad_request from %s: %s", (remote, reason)
            record.exc_info = record.exc_text = None
        return True


# The server's own log (requests it could not parse or answer), with the filter above.
_server_log = logging.getLogger("worker.http.server")
_server_log.addFilter(_BadRequests())


class HttpServer:
    def __init__(
        self,
        settings: HttpSettings,
        routes: list[web.RouteDef],
        subapps: dict[str, web.Application] | None = None,
    ) -> None:
        """`routes` at the root (the probes), each of `subapps` under its prefix (the API)."""
        self._settings = settings
        self._app = web.Application(client_max_size=MAX_BODY_BYTES)
        self._app.add_routes(routes)
        for prefix, subapp in (subapps or {}).items():
            self._app.add_subapp(prefix, subapp)
        # No access log: one line per request would flood the journal (a summary is in /metrics).
        self._runner = web.AppRunner(
            self._app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S, logger=_server_log
        )
        self._started = False

    async def start(self) -> None:
        """Listen; an OSError (the port taken, a host not this one's) leaves nothing behind."""
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self._settings.host, self._settings.port).start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self._started = True
        log.info("http.listening", host=self._settings.host, port=self.port)

    @property
    def port(self) -> int:
        """The port it listens on (`http.port = 0`: the one the system chose)."""
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the listener, let requests in progress finish (bounded), close connections."""
        if self._started:
            self._started = False
            await self._runner.cleanup()
