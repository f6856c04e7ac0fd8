"""Which store an error came from, where it is, and the settings that decide how we reach it.

One answer for every caller that reports a store's refusal or outage to a person: a
command's stderr line (worker/cli/errors.py) and the daemon's `stores.refused` line. The
address is the configured one with its password masked.
"""

from __future__ import annotations

from typing import NamedTuple

from worker.config import Settings, redact_url
from worker.retry import CertificateRefused, Refused, describe, is_certificate_refusal


class StoreSettings(NamedTuple):
    credentials: str  # what a refused login points at
    tls: str  # what an untrusted or refused certificate points at


# By the driver's top-level module name.
_SETTINGS = {
    "asyncpg": StoreSettings(
        "postgres.url and postgres.password_file", "postgres.url's sslrootcert, sslcert and sslkey"
    ),
    "redis": StoreSettings(
        "redis.url and redis.password_file", "redis.url's ssl_ca_certs, ssl_certfile and ssl_keyfile"
    ),
    "pymongo": StoreSettings(
        "documents.mongodb_url and documents.mongodb_password_file",
        "documents.mongodb_url's tlsCAFile and tlsCertificateKeyFile",
    ),
}
_SETTINGS["arq"] = _SETTINGS["redis"]
_SETTINGS["motor"] = _SETTINGS["pymongo"]


def _driver(exc: BaseException) -> str:
    if isinstance(exc, CertificateRefused):
        return exc.driver
    return type(exc).__module__.partition(".")[0]


def store_address(exc: BaseException, settings: Settings) -> str:
    """`postgres at postgresql://iotflow:***@db/iotflow`, by the error's driver."""
    driver = _driver(exc)
    if driver == "asyncpg":
        return f"postgres at {redact_url(settings.postgres.url)}"
    if driver in ("redis", "arq"):
        return f"redis at {redact_url(settings.redis.url)}"
    if driver in ("pymongo", "motor"):
        return f"mongodb at {redact_url(settings.documents.mongodb_url)}"
    if driver == "cassandra":
        return f"cassandra at {','.join(settings.cassandra.hosts)} port {settings.cassandra.port}"
    if driver == "aiokafka":
        return f"kafka at {settings.kafka.bootstrap}"
    return "a server"


def settings_to_check(exc: BaseException) -> str:
    """The settings a refusal points at: the TLS options for a certificate, else the credentials."""
    known = _SETTINGS.get(_driver(exc))
    if known is None:
        return "its URL and credentials"
    return known.tls if is_certificate_refusal(exc) else known.credentials


def refused_by_store(exc: BaseException, settings: Settings) -> Refused:
    """The daemon's report of a refusal: which store, where, why, and the settings to check."""
    if isinstance(exc, Refused) and not isinstance(exc, CertificateRefused):
        return exc  # one of ours, already worded (a broker's CONNACK, a Kafka id)
    found = Refused(f"{store_address(exc, settings)} refused us ({describe(exc)})")
    found.hint = f"check {settings_to_check(exc)}"
    return found
