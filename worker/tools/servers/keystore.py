"""A Java server's TLS identity from PEM files: a PKCS12 keystore, which Java 17 reads as it
reads a JKS one (Kafka's and Cassandra's client encryption in the tests and the bench)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["TlsIdentity", "write_pkcs12"]


@dataclass(frozen=True)
class TlsIdentity:
    """What a server needs for TLS: its keystore, and the CA its clients' certificates are
    checked against (PEM; for the listeners that ask for one)."""

    keystore: Path  # PKCS12: the server's certificate and key
    password: str
    ca_file: Path


def write_pkcs12(cert_file: Path, key_file: Path, keystore: Path, password: str) -> Path:
    """`cert_file` and `key_file` (PEM) as one PKCS12 keystore under `password`."""
    from cryptography import x509  # here: only a secured server needs it
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    data = pkcs12.serialize_key_and_certificates(
        b"server",
        key,  # type: ignore[arg-type]  # an EC or RSA key, as `iotflow certs` writes them
        cert,
        None,
        serialization.BestAvailableEncryption(password.encode()),
    )
    keystore.write_bytes(data)
    keystore.chmod(0o600)
    return keystore
