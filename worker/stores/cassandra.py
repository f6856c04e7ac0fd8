"""The Cassandra connection: one `Cluster` and its `Session`, and the bridge from the
driver's futures to asyncio.

cassandra-driver does its I/O on an event loop thread of its own (libev when the wheel
has it, as the cp311 wheels do; else its asyncio reactor, since asyncore is gone in
Python 3.12) and reports results through callbacks on that thread. `execute` turns a
`ResponseFuture` into an awaitable: its callbacks hand the outcome to our loop with
`call_soon_threadsafe`, so the loop never waits on the driver. A semaphore caps the
requests in flight (`cassandra.concurrency`).

The connection is made lazily, on first use, in a worker thread (`Cluster.connect`
blocks), so opening the stores never waits for Cassandra: in "both" mode the pipeline
may start while it is down. A failed connect shuts its `Cluster` down (the driver's
rule), so each attempt builds a new one. Once connected, the driver itself reconnects
to nodes that went away and came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from worker.config import CassandraSettings
from worker.retry import SettingRefused
from worker.stores.tls import client_context, tls_refusal

if TYPE_CHECKING:
    from cassandra.cluster import Cluster, ResponseFuture, ResultSet, Session
    from cassandra.query import PreparedStatement, Statement

log = structlog.get_logger("worker.stores.cassandra")

RECONNECT_MAX_S = 30.0


class _ReportedByUs(logging.Filter):
    """Drops the driver's lines about a failed connect (a warning per node, then an error):
    the caller's retry loop reports the outage once, with the same error."""

    PREFIXES = ("[control connection] Error connecting to", "Control connection failed to connect")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


_DRIVER_LOG = logging.getLogger("cassandra.cluster")
if not any(isinstance(f, _ReportedByUs) for f in _DRIVER_LOG.filters):
    _DRIVER_LOG.addFilter(_ReportedByUs())


def connection_class() -> type:
    """The driver's reactor: libev (C, in the wheel) or, without it, its asyncio reactor."""
    try:
        from cassandra.io.libevreactor import LibevConnection

        return LibevConnection
    except ImportError:  # a build without the C extension
        from cassandra.io.asyncioreactor import AsyncioConnection

        return AsyncioConnection


def consistency_level(name: str) -> int:
    from cassandra import ConsistencyLevel

    level: int = getattr(ConsistencyLevel, name.upper())
    return level


def _retry_policy() -> Any:
    """The driver's default policy, which also retries a write timeout once: every statement
    here is an idempotent upsert, so a second try cannot double anything."""
    from cassandra.policies import RetryPolicy

    class IdempotentRetryPolicy(RetryPolicy):
        def on_write_timeout(
            self,
            query: Any,
            consistency: int,
            write_type: Any,
            required_responses: int,
            received_responses: int,
            retry_num: int,
        ) -> tuple[int, Any]:
            if retry_num == 0:
                return self.RETRY, consistency
            return self.RETHROW, None

    return IdempotentRetryPolicy()


def build_cluster(settings: CassandraSettings) -> Cluster:
    """A `Cluster` (no connection yet): token-aware over DC-aware round robin, the configured
    consistency and timeouts in the default execution profile, the login (PasswordAuthenticator)
    and client encryption when configured."""
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy

    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=settings.local_dc)),
        retry_policy=_retry_policy(),
        consistency_level=consistency_level(settings.consistency),
        request_timeout=settings.request_timeout_s,
    )
    auth_provider = None
    if settings.username:
        from cassandra.auth import PlainTextAuthProvider

        auth_provider = PlainTextAuthProvider(username=settings.username, password=settings.password)
    ssl_context = None
    if settings.tls:
        ssl_context = client_context(
            "cassandra", settings.ca_file, settings.cert_file, settings.key_file, settings.check_hostname
        )
    return Cluster(
        contact_points=list(settings.hosts),
        auth_provider=auth_provider,
        ssl_context=ssl_context,
        port=settings.port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connection_class=connection_class(),
        connect_timeout=settings.connect_timeout_s,
        control_connection_timeout=settings.connect_timeout_s,
        # The driver's default waits up to 10 minutes between tries of a node that went away.
        reconnection_policy=ExponentialReconnectionPolicy(1.0, RECONNECT_MAX_S),
        protocol_version=4,  # Cassandra 3.0 and later; skips the driver's downgrade probing
    )


def connect_refusal(settings: CassandraSettings, exc: BaseException) -> SettingRefused | None:
    """A failed connect that our settings caused, as `SettingRefused` naming the setting: a node
    refused the login, or a TLS handshake failed (either side's certificate). None for an outage."""
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ != "NoHostAvailable" or not isinstance(errors, dict):
        return None
    import cassandra

    for node, error in errors.items():
        where = f"the node at {node}"  # an EndPoint prints as host:port
        if isinstance(error, cassandra.AuthenticationFailed):
            if not settings.username:
                return SettingRefused(f"cassandra.username: {where} asks for a login and none is configured")
            return SettingRefused(
                f"cassandra.password: {where} refused the login of user {settings.username!r}"
            )
        refused = tls_refusal("cassandra", "cassandra.tls", where, error)
        if refused is not None:
            return refused
    return None


async def bridge(response: ResponseFuture) -> ResultSet:
    """The result of a `ResponseFuture`, awaited without blocking the loop.

    The result set holds the first page only (`current_rows`, `paging_state`): iterating
    it would fetch the next page synchronously, on the loop.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if done.cancelled():
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def hand_over(exc: BaseException | None) -> None:  # on the driver's thread
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, exc)

    response.add_callbacks(lambda _rows: hand_over(None), hand_over)
    await done
    return response.result()  # already complete: the driver sets its result before the callbacks


def _retrieve(attempt: asyncio.Future[Any]) -> None:
    # Every caller may have stopped waiting; the error is theirs to report, not asyncio's.
    if not attempt.cancelled():
        attempt.exception()


class CassandraStore:
    """The session for the daemon, the jobs and the commands (one per process)."""

    def __init__(self, settings: CassandraSettings) -> None:
        self.settings = settings
        self._cluster: Cluster | None = None
        self._session: Session | None = None
        self._prepared: dict[str, PreparedStatement] = {}
        self._connecting: asyncio.Future[Session] | None = None
        self._slots: asyncio.Semaphore | None = None

    async def session(self) -> Session:
        """The session, connecting first if need be. Callers share one attempt, and one that
        gives up waiting (a readiness probe's timeout) does not cancel it for the others."""
        if self._session is not None:
            return self._session
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(_retrieve)
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> Session:
        cluster = build_cluster(self.settings)
        try:
            session = await asyncio.to_thread(cluster.connect)  # it blocks
        except BaseException as exc:
            self._connecting = None  # the driver shut this cluster down; the next call starts afresh
            refused = connect_refusal(self.settings, exc)
            if refused is not None:
                raise refused from exc
            raise
        self._cluster, self._session = cluster, session
        log.info("cassandra.connected", hosts=self.settings.hosts, local_dc=self.settings.local_dc)
        return session

    async def prepare(self, cql: str) -> PreparedStatement:
        """`cql` prepared once per session (the driver re-prepares on nodes that forget it)."""
        statement = self._prepared.get(cql)
        if statement is None:
            session = await self.session()
            # Session.prepare blocks, and the driver has no asynchronous form of it.
            prepared: PreparedStatement = await asyncio.to_thread(session.prepare, cql)
            prepared.is_idempotent = True  # every statement of ours is an upsert or a read
            self._prepared[cql] = statement = prepared
        return statement

    async def execute(
        self,
        statement: str | Statement,
        parameters: Sequence[Any] | None = None,
        *,
        paging_state: bytes | None = None,
    ) -> ResultSet:
        """One request, within the in-flight limit."""
        session = await self.session()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.concurrency)
        async with self._slots:
            response = session.execute_async(statement, parameters, paging_state=paging_state)
            return await bridge(response)

    async def ping(self) -> bool:
        result = await self.execute("SELECT release_version FROM system.local")
        return bool(result.current_rows)

    async def close(self) -> None:
        """Shut the cluster down (its threads and connections); a later request reconnects.
        Nothing else needs resetting: once connected, the driver reconnects to nodes that
        come back by itself (every `RECONNECT_MAX_S` at the latest)."""
        if self._connecting is not None:
            with contextlib.suppress(Exception):
                await self._connecting  # an attempt under way finishes first
        cluster, self._cluster, self._session, self._connecting = self._cluster, None, None, None
        self._prepared.clear()
        if cluster is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(cluster.shutdown)
