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


# The alerts a server ends a handshake with when it does not take our certificate (or its absence).
_CERTIFICATE_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")


def tls_refusal(store: str, tls_setting: str, where: str, error: BaseException) -> SettingRefused | None:
    """A failed TLS handshake as a refusal naming the setting to fix, None when `error` is not
    one. `tls_setting`: the store's setting that turns TLS on (`kafka.security_protocol`).
    The Cassandra driver keeps only the text of the ssl error (in an OSError): it is read too."""
    failed = tls_error(error)
    if isinstance(failed, ssl.SSLCertVerificationError):
        text = failed.verify_message or str(failed)
        verify = True
    elif failed is not None:
        text = str(failed.reason or failed)
        verify = False
    elif isinstance(error, OSError) and "[SSL" in str(error):
        text = str(error).rpartition("Last error: ")[2] or str(error)
        verify = "CERTIFICATE_VERIFY_FAILED" in text
    else:
        return None
    if verify:
        setting = f"{store}.check_hostname" if "mismatch" in text.lower() else f"{store}.ca_file"
        return SettingRefused(f"{setting}: the certificate of {where} is not trusted ({text})")
    if any(alert in text for alert in _CERTIFICATE_ALERTS):
        return SettingRefused(f"{store}.cert_file: {where} refused our TLS client certificate ({text})")
    if "WRONG_VERSION_NUMBER" in text:
        return SettingRefused(f"{tls_setting}: {where} does not answer TLS ({text})")
    return SettingRefused(f"{tls_setting}: the TLS handshake with {where} failed ({text})")


def tls_error(error: BaseException) -> ssl.SSLError | None:
    """The ssl error `error` is or wraps (a driver's connection error keeps it as its cause)."""
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
