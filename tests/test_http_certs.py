"""`POST /api/v1/certs/devices/{mac}` on a real daemon with the CA of `iotflow certs` in
`http.ca_dir`: a certificate for a registered device's MAC that chains to the CA and
matches the key handed back, once; admin only; off without `http.ca_dir`; the CA's key in
no answer and no log line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from worker.config import Settings
from worker.ops.certs import CertStore

from .helpers import running_daemon

TOKEN = "tok-" + "e" * 32
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MAC = "AA-BB-CC-00-00-42"


async def _api(settings: Settings, ca_dir: str) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    settings.http = replace(
        settings.http, enabled=True, port=0, api=True, admin_tokens=[TOKEN], ca_dir=ca_dir
    )
    async with running_daemon(settings) as daemon, aiohttp.ClientSession() as client:
        assert daemon.http is not None
        base = f"http://127.0.0.1:{daemon.http.port}/api/v1"
        body = {"device_key": "certified-1", "mac": MAC}
        async with client.post(f"{base}/devices/register", json=body, headers=ADMIN) as response:
            assert response.status == 201
        yield base, client


async def _post(client: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[int, Any]:
    async with client.post(url, headers=headers) as response:
        return response.status, await response.json()


@pytest.fixture
def ca(tmp_path: Path) -> CertStore:
    store = CertStore(tmp_path / "certs")
    store.init()
    return store


async def test_a_device_certificate_chains_to_the_ca_and_is_issued_once(
    settings: Settings, ca: CertStore, capsys: pytest.CaptureFixture[str]
) -> None:
    with capture_logs() as logs:
        async for base, client in _api(settings, str(ca.dir)):
            status, body = await _post(client, f"{base}/certs/devices/{MAC}", ADMIN)
            assert status == 201, body
            again = await _post(client, f"{base}/certs/devices/aabbcc000042", ADMIN)
            assert again[0] == 409 and again[1]["error"] == "certificate_exists"
            assert (await _post(client, f"{base}/certs/devices/aa:bb:cc:00:00:43", ADMIN))[0] == 404
            assert (await _post(client, f"{base}/certs/devices/not-a-mac", ADMIN))[0] == 422
            assert (await _post(client, f"{base}/certs/devices/{MAC}", {}))[0] == 401
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path("ca").read_bytes())
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    cert.verify_directly_issued_by(ca_cert)  # raises unless the CA signed it
    assert body["ca_certificate"].encode() == ca.cert_path("ca").read_bytes()
    assert body["device"] == "f2-aabbcc000042"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "f2-aabbcc000042"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    key = serialization.load_pem_private_key(body["private_key"].encode(), password=None)
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    logged = str(logs) + "".join(capsys.readouterr())
    ca_key = ca.key_path("ca").read_text().splitlines()[1]
    assert ca_key not in str(body) and ca_key not in logged
    assert body["private_key"].splitlines()[1] not in logged


async def test_without_a_ca_dir_the_api_issues_no_certificate(settings: Settings) -> None:
    async for base, client in _api(settings, ""):
        status, body = await _post(client, f"{base}/certs/devices/{MAC}", ADMIN)
        assert (status, body["error"]) == (404, "not_configured")


async def test_a_ca_dir_without_a_ca_is_one_warning_and_a_503(settings: Settings, tmp_path: Path) -> None:
    with capture_logs() as logs:
        async for base, client in _api(settings, str(tmp_path)):
            status, body = await _post(client, f"{base}/certs/devices/{MAC}", ADMIN)
    assert (status, body["error"]) == (503, "no_ca")
    assert [log["event"] for log in logs if log["log_level"] == "warning"] == ["api.certs_unavailable"]
