"""`iotflow certs`: the CA, its certificates, the CRL and the ACL (worker/ops/certs.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from worker.cli.app import run
from worker.ops.certs import CertError, CertStore, CertUsageError, device_identity


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.mark.parametrize("mac", ["AA:BB:CC:DD:EE:01", "aa-bb-cc-dd-ee-01", "aabbccddee01", "f2-AABBCCDDEE01"])
def test_a_device_is_named_by_its_topic_identity(mac: str) -> None:
    assert device_identity(mac) == "f2-aabbccddee01"


def test_a_bad_mac_is_a_usage_error() -> None:
    with pytest.raises(CertUsageError, match="not a MAC"):
        device_identity("aa:bb:cc")


def test_init_then_leaves_signed_by_the_ca_with_private_keys_0600(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "certs")
    ca = store.init(days=30)
    assert ca.created
    broker = store.broker("broker.local", ["127.0.0.1", "mosquitto"])
    device = store.device("AA-BB-CC-DD-EE-01")
    worker = store.client("iotflow-worker", key_type="rsa-2048")
    ca_cert = _cert(ca.cert)
    assert isinstance(ca_cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca_cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for issued in (ca, broker, device, worker):
        assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
        assert stat.S_IMODE(issued.cert.stat().st_mode) == 0o644
        _cert(issued.cert).verify_directly_issued_by(ca_cert)
    assert device.cert.name == "f2-aabbccddee01.crt" and _cn(_cert(device.cert)) == "f2-aabbccddee01"
    assert isinstance(_cert(worker.cert).public_key(), rsa.RSAPublicKey)
    san = _cert(broker.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.local", "mosquitto"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = _cert(broker.cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    # A leaf never outlives its CA, whatever --days says.
    assert _cert(device.cert).not_valid_after_utc <= ca_cert.not_valid_after_utc
    assert x509.load_pem_x509_crl(store.crl_path.read_bytes()).is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]


def test_existing_certificates_are_kept_unless_forced(tmp_path: Path) -> None:
    store = CertStore(tmp_path)
    store.init()
    first = store.device("aabbccddee01")
    serial = _cert(first.cert).serial_number
    assert not store.init().created
    assert not store.device("aa:bb:cc:dd:ee:01").created
    assert _cert(first.cert).serial_number == serial
    assert store.device("aa:bb:cc:dd:ee:01", force=True).created
    assert _cert(first.cert).serial_number != serial


def test_revoke_lists_the_certificate_as_revoked_in_a_crl_signed_by_the_ca(tmp_path: Path) -> None:
    store = CertStore(tmp_path)
    store.init()
    store.device("aabbccddee01")
    store.device("aabbccddee02")
    store.revoke("aa:bb:cc:dd:ee:02")  # by MAC or by name
    store.revoke("f2-aabbccddee02")  # twice is once
    crl = x509.load_pem_x509_crl(store.crl_path.read_bytes())
    assert [e.serial_number for e in crl] == [_cert(tmp_path / "f2-aabbccddee02.crt").serial_number]
    assert crl.is_signature_valid(_cert(tmp_path / "ca.crt").public_key())  # type: ignore[arg-type]
    status = {e.name: (e.kind, e.status) for e in store.entries()}
    assert status == {
        "ca": ("ca", "valid"),
        "f2-aabbccddee01": ("device", "valid"),
        "f2-aabbccddee02": ("device", "revoked"),
    }
    with pytest.raises(CertError, match="no certificate"):
        store.revoke("f2-aabbccddee09")


def test_nothing_is_issued_without_a_ca(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="certs init"):
        CertStore(tmp_path).device("aabbccddee01")
    assert list(tmp_path.iterdir()) == []


def test_the_acl_confines_every_client_to_its_identity_and_lets_readers_read(tmp_path: Path) -> None:
    store = CertStore(tmp_path)
    store.init()
    store.client("iotflow-worker")
    store.client("old-worker")
    store.revoke("old-worker")
    store.device("aabbccddee01")
    path, readers = store.write_acl()
    assert readers == ["iotflow-worker"]
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert lines == ["pattern write +/%u/#", "user iotflow-worker", "topic read #"]


def test_the_command_exits_2_on_a_bad_mac_and_1_without_a_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["certs", "device", "zz", "--dir", str(tmp_path)]) == 2
    assert "not a MAC address" in capsys.readouterr().err
    assert run(["certs", "device", "aabbccddee01", "--dir", str(tmp_path)]) == 1
    assert "certs init" in capsys.readouterr().err
    assert run(["certs", "list", "--dir", str(tmp_path)]) == 1  # an empty list would look like a CA
    assert capsys.readouterr().err == f"iotflow certs: no CA in {tmp_path}: run `iotflow certs init` first\n"
    assert run(["certs", "init", "--dir", str(tmp_path)]) == 0
    assert run(["certs", "device", "aabbccddee01", "--dir", str(tmp_path)]) == 0
    assert run(["certs", "list", "--json", "--dir", str(tmp_path)]) == 0
    assert '"f2-aabbccddee01"' in capsys.readouterr().out
