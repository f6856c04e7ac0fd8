"""`POST /api/v1/certs/devices/{mac}` (admin): a device certificate from the CA of
`iotflow certs` (worker/ops/certs.py) in `http.ca_dir`, for a device registered with that
MAC. The answer carries the device's certificate, its private key (shown this once; the
directory keeps a copy, as `iotflow certs device` does) and the CA certificate; the CA's
key never leaves the directory, and nothing of a key is logged."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from aiohttp import web

from worker.api.errors import ApiError, json_response
from worker.ops.certs import CA_NAME, CertError, CertStore, CertUsageError, device_identity
from worker.stores import Stores
from worker.stores.devices import canonical_mac

log = structlog.get_logger("worker.api")


def _issue(directory: Path, mac: str) -> dict[str, str]:
    """Blocking (key generation, files): run in a thread."""
    store = CertStore(directory)
    identity = device_identity(mac)
    if store.cert_path(identity).exists() or store.key_path(identity).exists():
        raise ApiError(
            409,
            "certificate_exists",
            f"{identity} has a certificate: `iotflow certs device {mac} --force` replaces it",
        )
    issued = store.device(mac)  # CertError without a CA there
    return {
        "device": identity,
        "certificate": issued.cert.read_text(),
        "private_key": issued.key.read_text(),
        "ca_certificate": store.cert_path(CA_NAME).read_text(),
    }


async def issue_device_certificate(stores: Stores, ca_dir: str, request: web.Request) -> web.Response:
    if not ca_dir:
        raise ApiError(404, "not_configured", "this worker issues no certificates (http.ca_dir is not set)")
    mac = request.match_info["mac"]
    canonical = canonical_mac(mac)
    if canonical is None:
        raise ApiError(422, "invalid_mac", f"{mac!r} is not a MAC address (example: aa:bb:cc:dd:ee:01)")
    device = await stores.postgres.fetchrow("SELECT id FROM devices WHERE mac = $1", canonical)
    if device is None:
        raise ApiError(404, "unknown_device", f"no device has the MAC {canonical}")
    try:
        answer = await asyncio.to_thread(_issue, Path(ca_dir), mac)
    except CertUsageError as exc:
        raise ApiError(422, "invalid_mac", str(exc)) from None
    except (CertError, OSError) as exc:  # no CA there, or a directory the worker cannot write
        log.warning("api.certs_unavailable", ca_dir=ca_dir, error=str(exc))
        raise ApiError(
            503, "no_ca", "the worker's CA cannot issue certificates now (its log says why)"
        ) from None
    log.info("api.certificate_issued", device_id=device["id"], identity=answer["device"])
    return json_response({"device_id": device["id"], **answer}, 201)
