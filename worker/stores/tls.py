"""The TLS context of a store client (Kafka, Cassandra) from its settings' files."""

from __future__ import annotations

import ssl

from worker.retry import SettingRefused


def client_context(
    store: str, ca_file: str, cert_file: str, key_file: str, check_hostname: bool
) -> ssl.SSLContext:
    """Verify the server against `ca_file` (the system's CAs without one), by name unless
    `check_hostname` is off, and present `cert_file`/`key_file` when set. A file the settings
    check found but that is not a certificate or a key is refused naming its setting."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise SettingRefused(f"{store}.ca_file: {ca_file} is not a usable CA file ({_reason(exc)})") from None
    context.check_hostname = check_hostname  # the chain is verified either way (CERT_REQUIRED)
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file or None)
        except (ssl.SSLError, OSError) as exc:
            raise SettingRefused(
                f"{store}.cert_file: {cert_file} with {store}.key_file {key_file} is not a usable "
                f"certificate and key ({_reason(exc)})"
            ) from None
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return getattr(exc, "strerror", None) or str(exc)


def verify_problem(exc: BaseException) -> str | None:
    """What a TLS error says about the server's certificate, None when it is not about that."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    return None


def is_hostname_mismatch(exc: BaseException | None) -> bool:
    return isinstance(exc, ssl.SSLCertVerificationError) and "mismatch" in (exc.verify_message or "").lower()
