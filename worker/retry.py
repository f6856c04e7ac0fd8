"""Waiting out a store that went away: which errors count, how long to wait, and the loop.

One classification (`is_transient`, `refusal`) and one backoff (`Backoff`, exponential with
jitter, so workers that lost the same server do not come back in lockstep) serve the
writer, the decoder, the rules actor, intake's reconnects, the supervisor's restarts
and the jobs' retries. Hand-written rather than a retry library's: the loop has to
report an outage once (not per try), flag the store down for /readyz and drop broken
connections between tries, and the jobs only need the delay, because arq re-queues
the job itself (`Retry(defer=…)`).
"""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import redis.exceptions
import structlog

log = structlog.get_logger("worker.retry")

T = TypeVar("T")


class Unreachable(Exception):
    """A server could not be reached when connecting: which one and where, so that a
    command's one line names it (the drivers' own errors, a bare ConnectionRefusedError
    from asyncpg, do not). Transient: waited out like the error it stands for (its cause)."""

    def __init__(self, service: str, address: str, error: str) -> None:
        super().__init__(service, address, error)  # all three: it pickles (arq keeps job errors)
        self.service = service
        self.address = address  # the URL or hosts, password masked
        self.error = error

    def __str__(self) -> str:
        return f"{self.service} at {self.address} is unreachable ({self.error})"


# Errors that mean "the store is away", worth waiting out; anything else is a bug and crashes.
# The drivers every deployment has; MongoDB's, Kafka's and Cassandra's are added by
# `is_transient` once their driver is loaded (importing them here would cost the daemon
# ~10 MB it may not need).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    Unreachable,
    OSError,  # refused, reset, unreachable; TimeoutError is one too
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # e.g. the connection was closed under us
    asyncpg.exceptions.CannotConnectNowError,  # starting up or shutting down
    # Class 57: statement timeout, admin shutdown, crash recovery.
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
    # Class 40: another writer (a second worker) held the rows; the transaction can simply run again.
    asyncpg.exceptions.TransactionRollbackError,
    # A replica promoted during failover answers read-only for a moment.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)


class Refused(Exception):
    """A server refused our credentials or permissions (or the database named does not
    exist): a configuration problem that waiting will not fix, so the daemon exits 2."""

    hint = "check the store's URL and credentials"  # what the operator should do about it


class CertificateRefused(Refused):
    """A TLS handshake failed on a certificate, raised for a driver that lets the ssl module's
    bare error out (asyncpg): `driver` says whose, so the report can name the store."""

    def __init__(self, driver: str, error: str) -> None:
        super().__init__(error)
        self.driver = driver


class SettingRefused(Refused):
    """Refused for a reason one setting names: a login, the server's certificate or ours, a
    key file. The message starts with that setting (`kafka.password: …`) and holds no secret."""

    hint = "fix the setting the message names"


REFUSAL_ERRORS: tuple[type[BaseException], ...] = (
    Refused,
    # Class 28 (wrong password, unknown role, pg_hba rejection) and a database that does not exist.
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
    redis.exceptions.AuthenticationError,  # a ConnectionError, so checked before TRANSIENT_ERRORS
    redis.exceptions.AuthenticationWrongNumberOfArgsError,
    redis.exceptions.NoPermissionError,
)

_OPTIONAL_DRIVERS = ("pymongo", "aiokafka", "cassandra")


@functools.cache
def _optional_errors(
    loaded: tuple[str, ...],
) -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(transient, refusals) of the optional drivers in `loaded`."""
    transient: list[type[BaseException]] = []
    refusals: list[type[BaseException]] = []
    if "pymongo" in loaded:
        from pymongo.errors import ConfigurationError, ConnectionFailure

        transient.append(ConnectionFailure)  # AutoReconnect, server selection timeouts
        refusals.append(ConfigurationError)
    if "aiokafka" in loaded:
        import aiokafka.errors as kafka

        transient += [
            kafka.KafkaConnectionError,  # refused, reset, no route
            kafka.KafkaTimeoutError,  # a send or a metadata fetch past request_timeout_ms
            kafka.NoBrokersAvailable,
            kafka.NodeNotReadyError,
            kafka.RequestTimedOutError,
            # A broker failed over: leadership moves, the group coordinator comes back.
            kafka.NotLeaderForPartitionError,
            kafka.LeaderNotAvailableError,
            kafka.NotEnoughReplicasError,
            kafka.NotEnoughReplicasAfterAppendError,
            kafka.GroupCoordinatorNotAvailableError,
            kafka.NotCoordinatorForGroupError,
            kafka.GroupLoadInProgressError,
            kafka.KafkaStorageError,
        ]
        refusals += [
            kafka.AuthenticationFailedError,
            kafka.AuthenticationMethodNotSupported,
            kafka.SaslAuthenticationFailed,
            kafka.TopicAuthorizationFailedError,
            kafka.GroupAuthorizationFailedError,
            kafka.ClusterAuthorizationFailedError,
        ]
    if "cassandra" in loaded:
        import cassandra
        from cassandra.cluster import NoHostAvailable
        from cassandra.connection import ConnectionException

        transient += [
            NoHostAvailable,  # no node answered, or none could take the request (see refusal())
            cassandra.OperationTimedOut,  # no answer within request_timeout_s (client side)
            cassandra.Timeout,  # ReadTimeout, WriteTimeout: too few replicas answered in time
            cassandra.Unavailable,  # too few replicas alive for the consistency level
            cassandra.CoordinationFailure,  # ReadFailure, WriteFailure: a replica failed (e.g. overloaded)
            ConnectionException,  # a connection closed under a request
        ]
        refusals += [cassandra.AuthenticationFailed]
    return tuple(transient), tuple(refusals)


def _loaded_optional() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    # An optional driver's error can only exist once the driver is imported.
    return _optional_errors(tuple(name for name in _OPTIONAL_DRIVERS if name in sys.modules))


def is_transient(exc: BaseException) -> bool:
    """The store is away (worth waiting out), and it is not a refusal."""
    if isinstance(exc, (*TRANSIENT_ERRORS, *_loaded_optional()[0])):
        return refusal(exc) is None
    return False


def refusal(exc: BaseException | None) -> BaseException | None:
    """The refusal `exc` is or holds (in an exception group or as its cause), or None."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (*REFUSAL_ERRORS, *_loaded_optional()[1])):
            return exc
        if _is_mongo_auth_failure(exc):
            return exc
        if _is_cassandra_refusal(exc):
            return exc
        if is_certificate_refusal(exc):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                found = refusal(inner)
                if found is not None:
                    return found
            return None
        exc = exc.__cause__
        seen += 1
    return None


def _is_mongo_auth_failure(exc: BaseException) -> bool:
    # pymongo reports a failed authentication as OperationFailure code 18 (AuthenticationFailed),
    # a command the user may not run (or run without logging in) as code 13 (Unauthorized).
    return type(exc).__name__ == "OperationFailure" and getattr(exc, "code", None) in (13, 18)


# What OpenSSL says when the server's certificate is not trusted (unknown CA, wrong host
# name, expired) or the server turned our client certificate down. The drivers keep it as
# an ssl error (asyncpg) or only as text in their own error (redis-py, PyMongo).
_CERTIFICATE_REFUSALS = (
    "CERTIFICATE_VERIFY_FAILED",
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_CERTIFICATE_UNKNOWN",
)


def is_certificate_refusal(exc: BaseException) -> bool:
    """A TLS handshake that failed on a certificate: trying again meets the same one."""
    if isinstance(exc, (ssl.SSLCertVerificationError, CertificateRefused)):
        return True
    text = str(exc)
    return any(words in text for words in _CERTIFICATE_REFUSALS)


def _is_cassandra_refusal(exc: BaseException) -> bool:
    # NoHostAvailable holds each node's error: every node refusing our credentials is a refusal.
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ != "NoHostAvailable" or not isinstance(errors, dict) or not errors:
        return False
    import cassandra

    return all(isinstance(error, cassandra.AuthenticationFailed) for error in errors.values())


def describe(exc: BaseException) -> str:
    """`Type: message`, one line, for a log field."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True, slots=True)
class Backoff:
    """Doubling delays from `first_s` up to `cap_s`, each drawn from its upper half."""

    first_s: float = 0.2
    cap_s: float = 10.0

    def delay(self, attempt: int) -> float:
        """The wait after the `attempt`-th failure in a row (1 for the first)."""
        ceiling = min(self.cap_s, self.first_s * 2 ** max(0, attempt - 1))
        return ceiling * (0.5 + random.random() / 2)

    def delays(self) -> Iterator[float]:
        """Delays for consecutive failures; start a new iterator after a success."""
        attempt = 0
        while True:
            attempt += 1
            yield self.delay(attempt)


STORE_BACKOFF = Backoff()


async def retry_transient(
    attempt: Callable[[], Awaitable[T]],
    event: str,
    *,
    reset: Callable[[], Awaitable[None]] | None = None,
    on_down: Callable[[BaseException], None] | None = None,
    on_up: Callable[[], None] | None = None,
    backoff: Backoff = STORE_BACKOFF,
    **context: Any,
) -> T:
    """Run `attempt` until it succeeds, sleeping with backoff after transient errors.

    One `{event}.unavailable` line when the outage starts and one `{event}.recovered`
    line when it ends, never one per retry. `reset` drops broken connections.
    """
    delays = backoff.delays()
    failing = False
    while True:
        try:
            result = await attempt()
        except Exception as exc:
            # A wrong password looks like a lost connection to redis-py: is_transient says no.
            if not is_transient(exc):
                raise
            if not failing:
                failing = True
                log.error(f"{event}.unavailable", error=repr(exc), **context)
            if on_down is not None:
                on_down(exc)
            if reset is not None:
                await reset()
            await asyncio.sleep(next(delays))
            continue
        if failing:
            log.info(f"{event}.recovered", **context)
            if on_up is not None:
                on_up()
        return result
