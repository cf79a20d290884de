"""The OpenAPI 3.1 document of the HTTP API (`GET /api/v1/openapi.json`), built from what the server runs.

Nothing restates a shape by hand where the code has one (`schemas`); the operations (`paths`) get the
role each needs from `access.rule_for` and the error replies each can give. Tests compare the
document's operations with the routes `build_app` registers, and fuzz the server against it.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from aiohttp import web

import otabox
from otabox.models import Role
from otabox.server import access
from otabox.server.http.openapi.paths import Op, operations, reply
from otabox.server.http.openapi.schemas import KEY, components, ref
from otabox.server.http.plumbing import API_PREFIX, json_response

ERROR_TEXT = {
    400: "Invalid input (the message names the field).",
    401: "No token, or a wrong one.",
    403: "The role does not allow it.",
    404: "Not found.",
    409: "Conflicts with the current state.",
    413: "Too large.",
    503: "The firmware storage (S3) did not answer or refused; nothing was stored.",
    507: "The server's disk is full; nothing was stored.",
}


def _path_params(path: str) -> list[dict[str, Any]]:
    out = []
    for name in re.findall(r"\{([^}]+)\}", path):
        schema = KEY if name in ("pk", "dk") else {"type": "string"}
        out.append({"name": name, "in": "path", "required": True, "schema": schema})
    return out


def _operation(op: Op) -> dict[str, Any]:
    rule = access.rule_for(op.method, op.path)
    api = op.path.startswith(API_PREFIX + "/") and op.security != "none"
    write = access.is_write(op.method)
    statuses = set(op.errors)
    if op.body is not None or op.params or write:
        statuses.add(400)
    if op.body is not None:
        statuses.add(413)
    if "{" in op.path:
        statuses.add(404)
    if op.security != "none":
        statuses.add(401)
    if api and rule.role != Role.VIEWER:
        statuses.add(403)
    if write:
        statuses.add(507)
    responses = dict(op.responses)
    for status in sorted(statuses):
        responses.setdefault(str(status), reply(ref("Error"), ERROR_TEXT.get(status, "Refused.")))
    out: dict[str, Any] = {
        "operationId": re.sub(r"[^A-Za-z0-9]+", "_", f"{op.method.lower()} {op.path}").strip("_"),
        "summary": op.summary,
        "tags": [_tag(op.path)],
        "parameters": [*_path_params(op.path), *op.params],
        "responses": responses,
    }
    if api:
        out["description"] = f"Needs the `{rule.role.value}` role."
        out["x-otabox-role"] = rule.role.value
        if write:
            out["x-otabox-action"] = rule.action
    out["security"] = {
        "none": [],
        "bearer": [{"bearer": []}],
        "optional": [{"bearer": []}, {}],
        "basic": [{"bearer": []}, {"basic": []}],
    }[op.security]
    if op.body is not None:
        out["requestBody"] = op.body
    return out


def _tag(path: str) -> str:
    if not path.startswith(API_PREFIX + "/"):
        return "server"
    word = path[len(API_PREFIX) + 1 :].split("/")[0].split(":")[0]
    return {"signing-key": "firmware", "publishers": "bundles", "openapi.json": "server", "nodes": "server"}.get(
        word, word
    )


@cache
def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (built once: it depends only on the code)."""
    paths: dict[str, dict[str, Any]] = {}
    for op in operations():
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "otabox management API",
            "version": otabox.__version__,
            "description": (
                "Firmware OTA server. JSON in and out; every failure is "
                '`{"error": {"code", "message"}}`. Lists are paged with limit/offset and answer '
                '`{"items", "total"}`. Times are ISO 8601 UTC.'
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [{"name": t} for t in dict.fromkeys(_tag(op.path) for op in operations())],
        "paths": paths,
        "components": {
            "schemas": components(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "The admin token or a personal token."},
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "User name and password (POST /tokens only).",
                },
            },
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    """Public: the document says how to call the API, nothing about what is stored."""
    return json_response(document())


def add_routes(web_app: web.Application) -> None:
    web_app.router.add_get(f"{API_PREFIX}/openapi.json", openapi_json)
