"""The operations of the OpenAPI document: every route of the HTTP API with its parameters, body and replies.

The bodies whose checks live in the services (products, devices, users, ...) are declared here, next
to nothing else; `tests/test_openapi.py` compares these operations with the routes `build_app`
registers and fuzzes the running server against them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otabox import models
from otabox.models import TASK_STATES, WEBHOOK_EVENTS, Role
from otabox.server.accounts import MAX_PASSWORD, MAX_TOKEN_SECONDS, MIN_PASSWORD
from otabox.server.firmware import SIGN_METHODS
from otabox.server.http.openapi.schemas import (
    JSON,
    KEY,
    TIME,
    VERSION,
    Schema,
    components,
    extend,
    listing,
    nullable,
    obj,
    ref,
)
from otabox.server.http.plumbing import API_PREFIX, MAX_OFFSET, MAX_PAGE
from otabox.server.registry import DEVICE_AUTH


def ref_schema(name: str) -> Schema:
    """A component's schema itself (to extend it)."""
    return dict(components()[name])


# ---------------------------------------------------------------- operations


def json_body(schema: Schema) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": schema}}}


def reply(schema: Schema | None, description: str = "OK", media: str = JSON) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": schema}}
    return out


def query(name: str, schema: Schema, description: str = "", required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


PAGE = (
    query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100}, "Page size."),
    query("offset", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0}, "Items to skip."),
)
STREAM = (query("format", {"type": "string", "enum": ["jsonl", "csv"], "default": "jsonl"}),)
TEXT_STREAM = {"application/x-ndjson": {"schema": {"type": "string"}}, "text/csv": {"schema": {"type": "string"}}}
NO_CONTENT = {"204": {"description": "Done."}}


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    responses: dict[str, Any]
    body: dict[str, Any] | None = None
    params: tuple[dict[str, Any], ...] = ()
    errors: tuple[int, ...] = ()
    security: str = "bearer"  # "none", "bearer", "optional" (/metrics), "basic" (POST /tokens also)


def _ok(name: str, status: str = "200") -> dict[str, Any]:
    return {status: reply(ref(name))}


def _list(name: str) -> dict[str, Any]:
    return {"200": reply(listing(ref(name)))}


def _fields(props: Mapping[str, Schema], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return json_body(obj(props, required))


def _tag_values() -> Schema:
    return {"type": "object", "additionalProperties": {"type": ["string", "number"]}}


def operations() -> list[Op]:
    p = API_PREFIX
    pk, dev = f"{p}/products/{{pk}}", f"{p}/products/{{pk}}/devices/{{dk}}"
    device_body = _fields(
        {
            "deviceKey": KEY,
            "deviceSecret": nullable(
                {"type": "string", "minLength": 8, "maxLength": 128, "description": "null: made up."}
            ),
            "tags": nullable(_tag_values()),
            "auth": {"type": "string", "enum": list(DEVICE_AUTH), "default": "sign"},
            "requireCertificate": {"type": "boolean", "default": False},
        },
        ("deviceKey",),
    )
    job_actions = [
        Op("POST", f"{p}/jobs/{{id}}/{a}", f"{a.capitalize()} a job", _ok("Job"), errors=(409,))
        for a in ("pause", "resume", "cancel")
    ]
    task_actions = [
        Op(
            "POST",
            f"{p}/jobs/{{id}}/tasks:{a}",
            f"{a.capitalize()} tasks of a job",
            {"200": reply(obj({"updated": {"type": "integer", "minimum": 0}}, ("updated",)))},
            _fields({"deviceKeys": {"type": "array", "minItems": 1, "items": KEY}}, ("deviceKeys",)),
            errors=(409,),
        )
        for a in ("cancel", "retry")
    ]
    secret_reply = {"200": reply(obj({"productSecret": {"type": "string"}}, ("productSecret",)))}
    return [
        Op(
            "GET",
            "/healthz",
            "Readiness",
            {
                "200": reply(obj({"status": {"const": "ok"}}, ("status",), closed=False)),
                "503": reply(obj({"status": {"const": "starting"}}, ("status",))),
            },
            security="none",
        ),
        Op(
            "GET",
            "/metrics",
            "Prometheus metrics",
            {"200": reply({"type": "string"}, media="text/plain")},
            security="optional",
        ),
        Op(
            "GET",
            "/ca.pem",
            "otabox's CA certificate",
            {"200": reply({"type": "string"}, media="application/x-pem-file")},
            security="none",
        ),
        Op(
            "GET",
            "/firmware/{id}/{file}",
            "Download a firmware file (devices; the fileUrl's token; Range resumes)",
            {
                "200": reply({"type": "string", "format": "binary"}, media="application/octet-stream"),
                "206": {"description": "Part of the file (Range)."},
            },
            params=(query("token", {"type": "string"}, "The download token of the fileUrl."),),
            errors=(401, 403, 503),
            security="none",
        ),
        Op(
            "GET",
            "/firmware/{id}/delta/{from}",
            "Download a binary delta (devices; the fileUrl's token)",
            {
                "200": reply({"type": "string", "format": "binary"}, media="application/octet-stream"),
                "206": {"description": "Part of the delta (Range)."},
            },
            params=(query("token", {"type": "string"}, "The download token of the fileUrl."),),
            errors=(401, 403, 503),
            security="none",
        ),
        Op("GET", f"{p}/openapi.json", "This document", {"200": reply({"type": "object"})}, security="none"),
        Op("GET", f"{p}/nodes", "The nodes sharing the database", _list("Node")),
        Op(
            "POST",
            f"{p}/products",
            "Create a product",
            _ok("ProductWithSecret", "201"),
            _fields(
                {
                    "productKey": KEY,
                    "name": {"type": "string", "minLength": 1, "maxLength": 256},
                    "dynamicActivation": {"type": "boolean", "default": False},
                },
                ("productKey",),
            ),
            errors=(409,),
        ),
        Op("GET", f"{p}/products", "List products", _list("Product"), params=PAGE),
        Op("GET", pk, "Show a product", _ok("Product")),
        Op(
            "PATCH",
            pk,
            "Change a product",
            _ok("ProductWithSecret"),
            _fields({"dynamicActivation": {"type": "boolean"}}),
        ),
        Op("POST", f"{pk}:rotate-secret", "New product secret", secret_reply, errors=(409,)),
        Op("POST", f"{pk}/devices", "Register a device", _ok("DeviceWithSecret", "201"), device_body, errors=(409,)),
        Op(
            "POST",
            f"{pk}/devices:import",
            "Register many devices (CSV or a JSON list)",
            {
                "200": reply(
                    obj(
                        {
                            "created": {"type": "integer"},
                            "rejected": {"type": "integer"},
                            "columns": {"type": "object"},
                            "errors": {
                                "type": "array",
                                "items": obj(
                                    {"row": {"type": "integer"}, "deviceKey": {}, "reason": {"type": "string"}},
                                    ("row", "deviceKey", "reason"),
                                ),
                            },
                            "devices": {
                                "type": "array",
                                "items": obj(
                                    {"deviceKey": {"type": "string"}, "deviceSecret": {"type": "string"}},
                                    ("deviceKey", "deviceSecret"),
                                ),
                            },
                        },
                        ("created", "rejected", "columns", "errors", "devices"),
                    )
                )
            },
            {
                "required": True,
                "content": {
                    JSON: {"schema": {"type": "array", "items": {"type": "object"}}},
                    "text/csv": {"schema": {"type": "string"}},
                },
            },
        ),
        Op(
            "GET",
            f"{pk}/devices",
            "List devices",
            _list("Device"),
            params=(
                *PAGE,
                query("version", {"type": "string"}, "Devices that last reported this version."),
                {
                    **query("tag", {"type": "array", "items": {"type": "string"}}, "key:value; repeat for several."),
                    "style": "form",
                    "explode": True,
                },
                query("online", {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]}),
            ),
        ),
        Op("GET", dev, "Show a device with its current task", _ok("DeviceWithTask")),
        Op(
            "PATCH",
            dev,
            "Change a device",
            _ok("Device"),
            _fields({"tags": _tag_values(), "requireCertificate": {"type": "boolean"}}),
        ),
        Op("DELETE", dev, "Remove a device", NO_CONTENT),
        Op(
            "POST",
            f"{dev}:rotate-secret",
            "New device secret",
            {"200": reply(obj({"deviceSecret": {"type": "string"}}, ("deviceSecret",)))},
        ),
        Op(
            "POST",
            f"{dev}/certificates",
            "Issue a device certificate",
            {
                "201": reply(
                    obj(
                        {
                            "serial": {"type": "string"},
                            "certificate": {"type": "string"},
                            "fingerprint": {"type": "string"},
                            "notAfter": TIME,
                            "privateKey": {"type": "string"},
                        },
                        ("serial", "certificate", "fingerprint", "notAfter"),
                    )
                )
            },
            _fields({"csr": {"type": "string"}, "validityDays": {"type": "integer", "minimum": 1, "maximum": 10950}}),
        ),
        Op("GET", f"{dev}/certificates", "List a device's certificates", _list("Certificate")),
        Op("DELETE", f"{dev}/certificates/{{serial}}", "Revoke a device certificate", _ok("Certificate")),
        Op(
            "POST",
            f"{pk}/firmware",
            "Upload firmware (multipart)",
            _ok("Firmware", "201"),
            {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": obj(
                            {
                                "file": {"type": "string", "format": "binary"},
                                "name": {"type": "string", "maxLength": 64},
                                "version": VERSION,
                                "desc": {"type": "string", "maxLength": 4096},
                                "signMethod": {"type": "string", "enum": list(SIGN_METHODS), "default": "sha256"},
                                "enableVerification": {"type": "string", "enum": ["true", "false"]},
                                "minSuccessForVerified": {"type": "integer", "minimum": 1, "maximum": 10},
                            },
                            ("file", "name", "version"),
                            closed=False,
                        )
                    }
                },
            },
            errors=(409, 503),
        ),
        Op("GET", f"{pk}/firmware", "List a product's firmware", _list("Firmware"), params=PAGE),
        Op("GET", f"{p}/firmware/{{id}}", "Show firmware", _ok("Firmware")),
        Op("DELETE", f"{p}/firmware/{{id}}", "Delete firmware", NO_CONTENT, errors=(409,)),
        Op(
            "GET",
            f"{p}/firmware/{{id}}/url",
            "Mint a device's download URL",
            {"200": reply(obj({"fileUrl": {"type": "string"}}, ("fileUrl",)))},
            params=(query("deviceKey", KEY, required=True),),
        ),
        Op(
            "GET",
            f"{p}/firmware/{{id}}/deltas",
            "The deltas made to this firmware",
            {"200": reply(obj({"items": {"type": "array", "items": ref("Delta")}}, ("items",)))},
        ),
        Op(
            "GET",
            f"{p}/signing-key",
            "The firmware signing key (public)",
            {
                "200": reply(
                    obj(
                        {"algorithm": {"const": "Ed25519"}, "publicKey": {"type": "string"}, "pem": {"type": "string"}},
                        ("algorithm", "publicKey", "pem"),
                    )
                )
            },
            errors=(404,),
            security="none",
        ),
        Op(
            "POST",
            f"{p}/publishers",
            "Trust a publisher",
            _ok("Publisher", "201"),
            _fields({"name": {"type": "string"}, "publicKey": {"type": "string"}}, ("name", "publicKey")),
            errors=(409,),
        ),
        Op("GET", f"{p}/publishers", "List trusted publishers", _list("Publisher")),
        Op("DELETE", f"{p}/publishers/{{name}}", "Stop trusting a publisher", NO_CONTENT),
        Op(
            "POST",
            f"{p}/bundles",
            "Import a signed bundle (multipart)",
            {"201": reply(obj({"firmware": {"type": "array", "items": ref("Firmware")}}, ("firmware",)))},
            {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": obj({"file": {"type": "string", "format": "binary"}}, ("file",), closed=False)
                    }
                },
            },
            errors=(403, 409, 503),
        ),
        Op(
            "POST",
            f"{p}/backup",
            "A backup of the data dir",
            {"200": reply({"type": "string", "format": "binary"}, media="application/gzip")},
            errors=(409,),
        ),
        Op("POST", f"{p}/jobs", "Create a job", _ok("Job", "201"), json_body(ref("JobBody")), errors=(404, 409)),
        Op(
            "GET",
            f"{p}/jobs",
            "List jobs",
            _list("Job"),
            params=(*PAGE, query("status", {"type": "string", "enum": [s.value for s in models.JobStatus]})),
        ),
        Op("GET", f"{p}/jobs/{{id}}", "Show a job", _ok("Job")),
        *job_actions,
        Op(
            "GET",
            f"{p}/jobs/{{id}}/tasks",
            "List a job's tasks",
            _list("Task"),
            params=(*PAGE, query("status", {"type": "string", "enum": [s.value for s in TASK_STATES]})),
        ),
        *task_actions,
        Op(
            "GET",
            f"{p}/events",
            "The upgrade log (JSON Lines of Event, or CSV)",
            {"200": {"description": "One Event per line (jsonl) or row (csv).", "content": TEXT_STREAM}},
            params=(
                query("jobId", {"type": "string"}),
                query("productKey", {"type": "string"}),
                query("since", TIME),
                *STREAM,
            ),
        ),
        Op(
            "POST",
            f"{p}/webhooks",
            "Subscribe a URL to events",
            _ok("Webhook", "201"),
            _fields(
                {
                    "url": {"type": "string", "format": "uri", "maxLength": 2000},
                    "events": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
                    },
                    "secret": {"type": "string", "minLength": 16, "maxLength": 256},
                },
                ("url", "events", "secret"),
            ),
        ),
        Op("GET", f"{p}/webhooks", "List webhooks", _list("Webhook")),
        Op("DELETE", f"{p}/webhooks/{{id}}", "Delete a webhook", NO_CONTENT),
        Op("GET", f"{p}/webhooks/{{id}}/deliveries", "A webhook's deliveries", _list("Delivery"), params=PAGE),
        Op(
            "POST",
            f"{p}/users",
            "Add a user",
            {
                "201": reply(
                    extend(ref_schema("User"), {"password": {"type": "string", "description": "When made up."}})
                )
            },
            _fields(
                {
                    "username": {"type": "string", "pattern": "^[A-Za-z0-9_.@-]{1,64}$"},
                    "role": {"type": "string", "enum": [r.value for r in Role]},
                    "password": {"type": "string", "minLength": MIN_PASSWORD, "maxLength": MAX_PASSWORD},
                },
                ("username", "role"),
            ),
            errors=(409,),
        ),
        Op("GET", f"{p}/users", "List users", _list("User")),
        Op(
            "PATCH",
            f"{p}/users/{{name}}",
            "Change a user's role or password",
            _ok("User"),
            _fields(
                {
                    "role": {"type": "string", "enum": [r.value for r in Role]},
                    "password": {"type": "string", "minLength": MIN_PASSWORD, "maxLength": MAX_PASSWORD},
                }
            ),
            errors=(409,),
        ),
        Op("DELETE", f"{p}/users/{{name}}", "Remove a user", NO_CONTENT, errors=(409,)),
        Op(
            "POST",
            f"{p}/tokens",
            "Create a personal token",
            {"201": reply(extend(ref_schema("Token"), {"token": {"type": "string"}}, ("token",)))},
            _fields(
                {
                    "name": {"type": "string", "minLength": 1, "maxLength": 100},
                    "expiresInSeconds": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TOKEN_SECONDS},
                },
                ("name",),
            ),
            security="basic",
        ),
        Op("GET", f"{p}/tokens", "List personal tokens", _list("Token")),
        Op("DELETE", f"{p}/tokens/{{id}}", "Revoke a personal token", NO_CONTENT),
        Op(
            "GET",
            f"{p}/audit",
            "The audit log (JSON Lines of AuditEntry, or CSV)",
            {"200": {"description": "One AuditEntry per line (jsonl) or row (csv).", "content": TEXT_STREAM}},
            params=(
                query("since", TIME),
                query("actor", {"type": "string"}),
                query("action", {"type": "string"}),
                *STREAM,
            ),
        ),
    ]
