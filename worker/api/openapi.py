"""The API's OpenAPI 3 document, served at /api/v1/openapi.json. tests/test_http_openapi.py
holds it to the router: every route documented, nothing documented that is not served."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or _ERROR}}}


_ERRORS = {
    "401": _answer("no credential, or a wrong, rotated or revoked one"),
    "503": _answer("the stores or the pipeline cannot take it now; Retry-After says when to retry"),
}
_DEVICE_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "a device id, device key or MAC",
    "schema": {"type": "string"},
}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_TIME = {"type": "string"}
_CONFIG = {
    "type": "object",
    "properties": {
        "device_id": {"type": "integer"},
        "user_id": {"type": "integer", "nullable": True},
        "config_version": {"type": "integer"},
        "settings": {"type": "object"},
    },
}
DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "IoTFlow worker device API", "version": "1"},
    "servers": [{"url": "/api/v1"}],
    "components": {
        "securitySchemes": {
            "admin": {"type": "http", "scheme": "bearer"},
            "device": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "detail"],
                "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
            },
        },
    },
    "paths": {
        "/devices/register": {
            "post": {
                "summary": "register a device: its row, its first API key, its config document",
                "security": [{"admin": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["device_key"],
                                "additionalProperties": False,
                                "properties": {
                                    "device_key": {"type": "string"},
                                    "name": {"type": "string"},
                                    "mac": {"type": "string"},
                                    "user": {"type": "string"},
                                    "datapoints": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "required": ["label"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "label": {"type": "string"},
                                                "unit": {"type": "string"},
                                                "min": {"type": "number"},
                                                "max": {"type": "number"},
                                            },
                                        },
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": _answer(
                        "registered; the key is shown this once",
                        {
                            "type": "object",
                            "properties": {
                                "device_id": {"type": "integer"},
                                "device_key": {"type": "string"},
                                "api_key": {"type": "string"},
                            },
                        },
                    ),
                    "400": _answer("the body is not JSON"),
                    "409": _answer("the device key or MAC is taken"),
                    "413": _answer("the body is over 256 KiB"),
                    "422": _answer("invalid_body or invalid_device: the detail names the problem"),
                    **_ERRORS,
                },
            }
        },
        "/telemetry": {
            "post": {
                "summary": "a device's JSON telemetry, answered once stored",
                "security": [{"device": []}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
                "responses": {
                    "200": _answer(
                        "stored", {"type": "object", "properties": {"accepted": {"type": "integer"}}}
                    ),
                    "400": _answer("bad_json: stored as a dead letter"),
                    "403": _answer("an admin token, or a device not active"),
                    "408": _answer("the body took more than 10 s"),
                    "413": _answer("the body is too large"),
                    "422": _answer("a dead letter's reason: stored as a dead letter"),
                    "429": _answer("rate_limited; Retry-After is the window"),
                    **_ERRORS,
                },
            }
        },
        "/devices/{id}/status": {
            "get": {
                "summary": "online, last seen and the latest values",
                "security": [{"device": []}, {"admin": []}],
                "parameters": [_DEVICE_PARAM],
                "responses": {
                    "200": _answer(
                        "the device's status",
                        {
                            "type": "object",
                            "properties": {
                                "device_id": {"type": "integer"},
                                "online": {"type": "boolean"},
                                "last_seen": {"type": "string", "nullable": True},
                                "latest": {"type": "object", "additionalProperties": {"type": "number"}},
                            },
                        },
                    ),
                    "403": _answer("a device key asking for another device, or a device not active"),
                    "404": _answer("an admin asking for a device none is"),
                    **_ERRORS,
                },
            }
        },
        "/telemetry/{id}": {
            "get": {
                "summary": "readings, newest first, paged",
                "security": [{"device": []}, {"admin": []}],
                "parameters": [
                    _DEVICE_PARAM,
                    _query("start", "ISO 8601, epoch ms or relative (-24h); default -24h", _TIME),
                    _query("end", "ISO 8601, epoch ms, relative or now; default now", _TIME),
                    _query("measurement", "one datapoint label", {"type": "string"}),
                    _query("limit", "1 to 1000, default 100", {"type": "integer"}),
                    _query("cursor", "next_cursor of the page before", {"type": "string"}),
                ],
                "responses": {
                    "200": _answer(
                        "a page of readings",
                        {
                            "type": "object",
                            "properties": {
                                "store": {"type": "string"},
                                "readings": {"type": "array", "items": {"type": "object"}},
                                "next_cursor": {"type": "string", "nullable": True},
                            },
                        },
                    ),
                    "400": _answer("bad_query or bad_cursor"),
                    "403": _answer("a device key asking for another device, or a device not active"),
                    "404": _answer("an admin asking for a device none is"),
                    **_ERRORS,
                },
            }
        },
        "/devices/{id}/config": {
            "get": {
                "summary": "the device's config document; its ETag is its config_version",
                "security": [{"device": []}, {"admin": []}],
                "parameters": [_DEVICE_PARAM],
                "responses": {
                    "200": _answer("the config document", _CONFIG),
                    "403": _answer("a device key asking for another device, or a device not active"),
                    "404": _answer("an admin asking for a device none is"),
                    **_ERRORS,
                },
            },
            "put": {
                "summary": "replace the settings (rules checked); If-Match: only that version",
                "security": [{"admin": []}],
                "parameters": [
                    _DEVICE_PARAM,
                    {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["settings"],
                                "additionalProperties": False,
                                "properties": {"settings": {"type": "object"}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _answer("stored, with its new ETag", _CONFIG),
                    "400": _answer("the body is not JSON"),
                    "404": _answer("no such device"),
                    "412": _answer("stale_config: If-Match names another version"),
                    "413": _answer("the body is over 256 KiB"),
                    "422": _answer("invalid_body, or invalid_config naming the faulty rule field"),
                    **_ERRORS,
                },
            },
        },
        "/certs/devices/{mac}": {
            "post": {
                "summary": "a certificate for the device with this MAC from the CA in http.ca_dir",
                "security": [{"admin": []}],
                "parameters": [
                    {
                        "name": "mac",
                        "in": "path",
                        "required": True,
                        "description": "the device's MAC, any spelling (aa:bb:cc:dd:ee:01, AABBCCDDEE01)",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "201": _answer(
                        "issued; the private key is shown this once",
                        {
                            "type": "object",
                            "properties": {
                                "device_id": {"type": "integer"},
                                "device": {"type": "string"},
                                "certificate": {"type": "string"},
                                "private_key": {"type": "string"},
                                "ca_certificate": {"type": "string"},
                            },
                        },
                    ),
                    "404": _answer("not_configured: no http.ca_dir; unknown_device: no device has the MAC"),
                    "409": _answer(
                        "certificate_exists: the device has one (iotflow certs device MAC --force)"
                    ),
                    "422": _answer("invalid_mac: not a MAC address"),
                    "401": _ERRORS["401"],
                    "503": _answer(
                        "no_ca: no CA in http.ca_dir, or the worker cannot write there; or starting"
                    ),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "this document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3", "content": {"application/json": {}}}},
            }
        },
    },
}
