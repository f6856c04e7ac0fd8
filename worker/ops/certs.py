"""A small certificate authority for mutual TLS between Mosquitto, the workers and the devices.

Everything lives in one directory (`iotflow certs --dir`, default /etc/iotflow/certs):

    ca.crt  ca.key          the CA (self-signed; `cRLSign` so it signs the CRL too)
    crl.pem                 the revocation list Mosquitto's `crlfile` reads (written by `init`, empty)
    server.crt  server.key  the broker (`broker HOST`; SAN: HOST and every `--san`)
    NAME.crt  NAME.key      one per client: devices `f2-aabbccddee01` (CN = the topic identity),
                            workers and other clients (`client NAME`)
    acl                     a Mosquitto `acl_file` (`acl`): each client publishes only under its
                            own identity (`+/CN/#`), the readers (workers) read everything

The directory is the state: `list` reads the certificates in it and the CRL, `revoke` adds a
certificate's serial to the CRL. Keys are written 0600, certificates, the CRL and the ACL
0644, each through a temporary file renamed into place. Written with `cryptography`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DIR = Path("/etc/iotflow/certs")
CA_DAYS = 3650
LEAF_DAYS = 825  # what browsers and Apple platforms still accept for a leaf
ORGANIZATION = "IoTFlow"
CA_NAME = "ca"
CRL_FILE = "crl.pem"
ACL_FILE = "acl"
BROKER_NAME = "server"

KeyType = Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"]
KEY_TYPES: tuple[KeyType, ...] = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")
Kind = Literal["ca", "broker", "device", "client"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RESERVED = {CA_NAME, "crl", ACL_FILE}


class CertError(Exception):
    """A request that cannot be done as things are: no CA yet, no such certificate, a half pair."""


class CertUsageError(CertError):
    """A request that is wrong in itself: a bad MAC, name or SAN (a bad command line: exit 2)."""


@dataclass(frozen=True)
class Issued:
    name: str
    cert: Path
    key: Path
    created: bool  # False: an existing certificate was kept


@dataclass(frozen=True)
class Entry:
    name: str
    kind: Kind
    subject: str
    serial: int
    not_after: dt.datetime
    status: Literal["valid", "expired", "revoked"]


def device_identity(mac: str) -> str:
    """`AA-BB-CC-DD-EE-01`, `aa:bb:cc:dd:ee:01`, `aabbccddee01` → `f2-aabbccddee01`: the device
    level of its topics, normalised as the decoder does (worker/decode/parse.normalise_mac)."""
    from worker.decode.parse import Rejected, normalise_mac

    text = mac[3:] if mac.lower().startswith("f2-") else mac
    try:
        return "f2-" + normalise_mac(text).replace(":", "")
    except Rejected:
        raise CertUsageError(f"{mac!r} is not a MAC address (example: aa:bb:cc:dd:ee:01)") from None


def check_name(name: str) -> str:
    if not _NAME.match(name) or name in _RESERVED:
        raise CertUsageError(
            f"{name!r} is not a usable name: letters, digits, '.', '_', '-' (at most 64), "
            f"not {', '.join(sorted(_RESERVED))}"
        )
    return name


class CertStore:
    """The CA and everything it issued, in one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    # -- paths ---------------------------------------------------------------------------
    def cert_path(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key_path(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def crl_path(self) -> Path:
        return self.dir / CRL_FILE

    # -- the CA --------------------------------------------------------------------------
    def init(
        self, days: int = CA_DAYS, key_type: KeyType = "ec-p256", common_name: str = "IoTFlow MQTT CA"
    ) -> Issued:
        """Create the CA and an empty CRL; an existing CA is kept (delete both files to replace it)."""
        _check_days(days)
        crt, key = self.cert_path(CA_NAME), self.key_path(CA_NAME)
        if crt.exists() and key.exists():
            if not self.crl_path.exists():
                self._write_crl(self._load_ca(), [])
            return Issued(CA_NAME, crt, key, created=False)
        if crt.exists() or key.exists():
            raise CertError(f"only one of {crt} and {key} exists: refusing to replace it")
        self.dir.mkdir(parents=True, exist_ok=True)
        private = _new_key(key_type)
        subject = _name(common_name)
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(private.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(private, hashes.SHA256())
        )
        _write(key, _key_pem(private), 0o600)
        _write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        self._write_crl((cert, private), [])
        return Issued(CA_NAME, crt, key, created=True)

    # -- leaves --------------------------------------------------------------------------
    def broker(
        self,
        host: str,
        sans: list[str] | None = None,
        days: int = LEAF_DAYS,
        key_type: KeyType = "ec-p256",
        name: str = BROKER_NAME,
        force: bool = False,
    ) -> Issued:
        """The broker's certificate: CN = host, SAN = host and each of `sans` (DNS names or IPs)."""
        alt_names = [_general_name(value) for value in dict.fromkeys([host, *(sans or [])])]
        return self._issue(
            check_name(name), host, "broker", days, key_type, force, x509.SubjectAlternativeName(alt_names)
        )

    def device(
        self, mac: str, days: int = LEAF_DAYS, key_type: KeyType = "ec-p256", force: bool = False
    ) -> Issued:
        """A device's certificate: CN (and file name) = its topic identity, `f2-aabbccddee01`."""
        identity = device_identity(mac)
        return self._issue(identity, identity, "device", days, key_type, force)

    def client(
        self, name: str, days: int = LEAF_DAYS, key_type: KeyType = "ec-p256", force: bool = False
    ) -> Issued:
        """Any other client (a worker, an operator's tool): CN = name, the MQTT user name."""
        check_name(name)
        if name.lower().startswith("f2-"):
            raise CertUsageError(
                f"{name!r}: names starting with f2- are devices (`iotflow certs device MAC`)"
            )
        return self._issue(name, name, "client", days, key_type, force)

    def _issue(
        self,
        name: str,
        common_name: str,
        kind: Kind,
        days: int,
        key_type: KeyType,
        force: bool,
        san: x509.SubjectAlternativeName | None = None,
    ) -> Issued:
        _check_days(days)
        crt, key = self.cert_path(name), self.key_path(name)
        if not force and crt.exists() and key.exists():
            return Issued(name, crt, key, created=False)
        if not force and (crt.exists() or key.exists()):
            raise CertError(f"only one of {crt} and {key} exists: refusing to replace it (--force does)")
        ca_cert, ca_key = self._load_ca()
        private = _new_key(key_type)
        now = _now()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(private, rsa.RSAPrivateKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(key, _key_pem(private), 0o600)
        _write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return Issued(name, crt, key, created=True)

    # -- listing and revocation ----------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every certificate in the directory, the CA first, with its state; CertError
        without a CA (a directory never initialised, or a wrong `--dir`)."""
        if not self.cert_path(CA_NAME).exists():
            raise CertError(f"no CA in {self.dir}: run `iotflow certs init` first")
        revoked = self.revoked_serials()
        now = _now()
        result = []
        for path in sorted(self.dir.glob("*.crt"), key=lambda p: (p.stem != CA_NAME, p.stem)):
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            status: Literal["valid", "expired", "revoked"] = "valid"
            if cert.serial_number in revoked:
                status = "revoked"
            elif cert.not_valid_after_utc < now:
                status = "expired"
            result.append(
                Entry(
                    path.stem,
                    _kind(path.stem, cert),
                    _cn(cert),
                    cert.serial_number,
                    cert.not_valid_after_utc,
                    status,
                )
            )
        return result

    def revoked_serials(self) -> set[int]:
        if not self.crl_path.exists():
            return set()
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        return {entry.serial_number for entry in crl}

    def revoke(self, name: str) -> Path:
        """Add NAME's certificate (a file name, or a device's MAC) to the CRL; the broker reads it
        at start, so restart Mosquitto afterwards."""
        crt: Path | None = self.cert_path(name) if _NAME.match(name) else None
        if crt is None or not crt.exists():
            try:
                crt = self.cert_path(device_identity(name))
            except CertUsageError:
                crt = None
        if name == CA_NAME or crt is None or not crt.exists():
            raise CertError(f"no certificate {self.cert_path(name)} to revoke")
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        ca = self._load_ca()
        entries = []
        if self.crl_path.exists():
            entries = list(x509.load_pem_x509_crl(self.crl_path.read_bytes()))
        if cert.serial_number not in {entry.serial_number for entry in entries}:
            entries.append(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(_now())
                .build()
            )
        self._write_crl(ca, entries)
        return self.crl_path

    def _write_crl(
        self, ca: tuple[x509.Certificate, PrivateKey], entries: list[x509.RevokedCertificate]
    ) -> None:
        ca_cert, ca_key = ca
        number = 1
        if self.crl_path.exists():
            previous = x509.load_pem_x509_crl(self.crl_path.read_bytes())
            with contextlib.suppress(x509.ExtensionNotFound):
                number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            # OpenSSL refuses every client once a CRL is past its next update: let this one
            # last as long as the CA, and rewrite it at each revocation.
            .next_update(ca_cert.not_valid_after_utc)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        for entry in entries:
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(ca_key, hashes.SHA256())
        _write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)

    # -- the Mosquitto ACL ---------------------------------------------------------------
    def write_acl(self, path: Path | None = None, readers: list[str] | None = None) -> tuple[Path, list[str]]:
        """A Mosquitto `acl_file` for `use_identity_as_username true`: every client may publish
        only under its own identity, `+/{CN}/#` (`tele/f2-…/…`, `stat/f2-…/…`,
        `devices/{key}/telemetry`); the readers (default: every valid client certificate,
        the workers) may subscribe to everything."""
        if readers is None:
            readers = [e.subject for e in self.entries() if e.kind == "client" and e.status == "valid"]
        for reader in readers:
            check_name(reader)
        lines = [
            "# Mosquitto acl_file written by `iotflow certs acl`; with use_identity_as_username true",
            "# the MQTT user name is the client certificate's CN.",
            "# Every client publishes only under its own identity: tele/f2-X/…, stat/f2-X/…, devices/X/…",
            "pattern write +/%u/#",
        ]
        for reader in readers:
            lines += ["", f"user {reader}", "topic read #"]
        target = path or self.dir / ACL_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        _write(target, ("\n".join(lines) + "\n").encode(), 0o644)
        return target, readers

    def _load_ca(self) -> tuple[x509.Certificate, PrivateKey]:
        crt, key = self.cert_path(CA_NAME), self.key_path(CA_NAME)
        if not (crt.exists() and key.exists()):
            raise CertError(f"no CA in {self.dir}: run `iotflow certs init` first")
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CertError(f"{key} holds a key type this tool does not sign with")
        return x509.load_pem_x509_certificate(crt.read_bytes()), private


def _kind(name: str, cert: x509.Certificate) -> Kind:
    if name == CA_NAME:
        return "ca"
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if ExtendedKeyUsageOID.SERVER_AUTH in usages:
        return "broker"
    return "device" if _cn(cert).startswith("f2-") else "client"


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*", value):
        raise CertUsageError(f"{value!r} is neither a host name nor an IP address (example: broker.local)")
    return x509.DNSName(value)


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa-2048", "rsa-3072", "rsa-4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise CertUsageError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _check_days(days: int) -> None:
    if days < 1:
        raise CertUsageError(f"--days {days}: must be 1 or more")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file created with `mode` (never a moment more open), then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
