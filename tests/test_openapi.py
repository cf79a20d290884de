"""The OpenAPI document: valid OpenAPI 3.1, every route in it and nothing else, built from the code's
definitions, served without a token, rendered by the console; and the running server fuzzed against it.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate

from otabox import jobspec
from otabox.errors import BadRequest
from otabox.models import Role
from otabox.server import access
from otabox.server.http.openapi import document
from otabox.server.http.openapi.schemas import components, job_body_schema
from tests.conftest import Server
from tests.test_docs import path_pattern, routes

METHODS = ("get", "put", "post", "patch", "delete")


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item if m in METHODS}


def served_routes() -> set[tuple[str, str]]:
    """The routes of the document's scope: everything but the console (its pages, its assets, and `/`,
    which sends a browser to it)."""
    return {(m, p) for m, p in routes() if p != "/" and not p.startswith("/ui")}


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    validate(doc)  # raises OpenAPIValidationError
    assert doc["openapi"].startswith("3.1")
    assert doc["servers"] == [{"url": "/"}]


def test_every_route_is_in_the_document_and_every_operation_is_a_route() -> None:
    ops = operations(document())
    known = served_routes()
    missing = [r for r in sorted(known) if not any(r[0] == m and path_pattern(r[1]).fullmatch(p) for m, p in ops)]
    assert not missing, f"routes missing from the OpenAPI document: {missing}"
    stray = [o for o in sorted(ops) if not any(o[0] == m and path_pattern(p).fullmatch(o[1]) for m, p in known)]
    assert not stray, f"operations of the OpenAPI document that no route serves: {stray}"


def test_each_operation_names_the_role_the_server_enforces() -> None:
    for path, item in document()["paths"].items():
        for method, op in item.items():
            if not path.startswith("/api/v1/") or op["security"] == []:
                continue
            role = access.rule_for(method.upper(), path).role
            assert op["x-otabox-role"] == role.value, (method, path)
            assert f"`{role.value}`" in op["description"]
            assert ("403" in op["responses"]) == (role != Role.VIEWER), (method, path)


def test_every_error_reply_has_the_error_shape() -> None:
    for path, item in document()["paths"].items():
        for method, op in item.items():
            for status, reply in op["responses"].items():
                if status.startswith(("4", "5")) and path != "/healthz":
                    schema = reply["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


def test_the_job_body_is_the_job_spec_table() -> None:
    schema = job_body_schema()
    assert set(schema["properties"]) == jobspec.BODY_KEYS
    assert schema["required"] == ["firmwareId"]
    for f in jobspec.JOB_FIELDS:
        head, _, rest = f.path.partition(".")
        node = schema["properties"][head]
        if rest:
            node = node["properties"][rest]
        assert node["description"].startswith(f.help), f.path
        if f.choices:
            assert node["enum"] == list(f.choices)
    example = components()["JobBody"]["examples"][0]
    jobspec.validate(example)  # the document's example is a body the API takes
    assert set(example) == jobspec.BODY_KEYS


def test_response_schemas_follow_the_presenters() -> None:
    schemas = components()
    task = schemas["Task"]
    assert task["properties"]["status"]["enum"][0] == "pending"
    assert task["properties"]["publishedAt"] == {"type": ["string", "null"], "format": "date-time"}
    assert "signature" in schemas["Firmware"]["properties"] and "signature" not in schemas["Firmware"]["required"]
    job = schemas["Job"]
    assert {"counts", "waiting", "retry", "maxConcurrency"} <= set(job["required"])
    assert "abort" not in job["required"]


def test_a_body_outside_the_table_is_refused() -> None:
    # What the document says the body may not have, the API refuses (checked at the edge, nothing stored).
    base = {"firmwareId": "fw-1"}
    for extra in (
        {"retry": {"count": 1, "every": 5}},
        {"abort": {"failureRatio": 0.5, "x": 1}},
        {"schedule": {"start": "2030-01-01T00:00:00Z", "zone": "CET"}},
        {"waves": [{"percent": 100, "gate": 0.5}]},
        {"schedule": {"timezoneOffsetMinutes": 100000}},
        {"schedule": {"start": ""}},
        {"name": 5},
    ):
        with pytest.raises(BadRequest):
            jobspec.validate({**base, **extra})
    # null means "not given" for the fields the document marks nullable
    spec = jobspec.validate({**base, "maxConcurrency": None, "retry": None, "schedule": {"start": None}})
    assert spec.max_concurrency is None and spec.retry_count == 0 and spec.schedule.start is None


async def test_the_document_is_served_without_a_token(server: Server) -> None:
    async with aiohttp.ClientSession() as anonymous, anonymous.get(server.url + "/api/v1/openapi.json") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        assert await resp.json() == document()
