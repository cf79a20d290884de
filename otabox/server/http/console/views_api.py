"""The API reference page (`/ui/api`): the OpenAPI document rendered by the console's own templates.

No Swagger UI or other bundle: the page is plain server-side HTML from the same document
`GET /api/v1/openapi.json` serves, so it works offline and shows exactly what the server checks.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from otabox.server.http.console.render import render
from otabox.server.http.openapi import document

METHOD_ORDER = ("get", "post", "patch", "put", "delete")


def _ref_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[1] if isinstance(ref, str) else None


def type_text(schema: dict[str, Any]) -> str:
    """A schema in a few words: `string (date-time) or null`, `array of Task`, `Job`."""
    name = _ref_name(schema)
    if name:
        return name
    if "anyOf" in schema:
        return " or ".join(type_text(s) for s in schema["anyOf"])
    if "const" in schema:
        return json.dumps(schema["const"])
    kinds = schema.get("type", "any")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    words = []
    for kind in kinds:
        if kind == "array":
            words.append(f"array of {type_text(schema.get('items', {}))}")
        elif kind == "string" and "enum" in schema:
            words.append(" | ".join(str(v) for v in schema["enum"] if v is not None))
        elif kind == "string" and "format" in schema:
            words.append(f"string ({schema['format']})")
        else:
            words.append(str(kind))
    return " or ".join(words)


def limits_text(schema: dict[str, Any]) -> str:
    keys = ("minimum", "exclusiveMinimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "pattern")
    signs = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<="}
    parts = [f"{signs.get(k, k)} {schema[k]}" for k in keys if k in schema]
    if "default" in schema:
        parts.append(f"default {json.dumps(schema['default'])}")
    return ", ".join(parts)


def fields(schema: dict[str, Any], schemas: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """The rows of an object schema's table (a `$ref` is followed once); the fields of an inline
    object follow it as `retry.count`, as the job reference writes them."""
    name = _ref_name(schema) if not prefix else None
    target = schemas[name] if name else schema
    if "anyOf" in target:
        target = next((s for s in target["anyOf"] if "properties" in s), target)
    required = set(target.get("required", ()))
    rows = []
    for key, prop in target.get("properties", {}).items():
        rows.append(
            {
                "name": prefix + key,
                "type": type_text(prop),
                "required": key in required,
                "limits": limits_text(prop),
                "description": prop.get("description", ""),
            }
        )
        if "properties" in prop:
            rows.extend(fields(prop, schemas, f"{prefix}{key}."))
    return rows


def _media(content: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": media, "schema": type_text(body.get("schema", {}))} for media, body in content.items()]


def operations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every operation of the document in the order the page shows them (by tag, then path)."""
    schemas = doc["components"]["schemas"]
    out = []
    for path, item in doc["paths"].items():
        for method in sorted(item, key=METHOD_ORDER.index):
            op = item[method]
            body: dict[str, Any] = op.get("requestBody", {}).get("content", {})
            first: dict[str, Any] = next(iter(body.values()))["schema"] if body else {}
            out.append(
                {
                    "id": op["operationId"],
                    "tag": op["tags"][0],
                    "method": method.upper(),
                    "path": path,
                    "summary": op["summary"],
                    "role": op.get("x-otabox-role", ""),
                    "public": op["security"] == [],
                    "parameters": [
                        {
                            "name": p["name"],
                            "in": p["in"],
                            "required": p.get("required", False),
                            "type": type_text(p["schema"]),
                            "limits": limits_text(p["schema"]),
                            "description": p.get("description", ""),
                        }
                        for p in op.get("parameters", [])
                    ],
                    "body": _media(body),
                    "body_fields": fields(first, schemas) if first else [],
                    "responses": [
                        {"status": status, "description": r["description"], "media": _media(r.get("content", {}))}
                        for status, r in op["responses"].items()
                    ],
                }
            )
    tags = [t["name"] for t in doc["tags"]]
    return sorted(out, key=lambda o: (tags.index(o["tag"]), o["path"], METHOD_ORDER.index(o["method"].lower())))


async def api_reference(request: web.Request) -> web.Response:
    doc = document()
    schemas = doc["components"]["schemas"]
    models = [
        {"name": name, "fields": fields(schema, schemas), "type": type_text(schema)} for name, schema in schemas.items()
    ]
    ops = operations(doc)
    return render(
        request,
        "api.html",
        {
            "info": doc["info"],
            "tags": list(dict.fromkeys(o["tag"] for o in ops)),
            "ops": ops,
            "models": models,
        },
    )


def add_routes(sub: web.Application) -> None:
    sub.router.add_get("/api", api_reference)
