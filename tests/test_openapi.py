"""The OpenAPI document: valid OpenAPI 3.1, every route in it and nothing else, built from the code's
definitions, served without a token, rendered by the console; and the running server fuzzed against it.
"""

from __future__ import annotations

import asyncio
import html
import re
import sys
from typing import Any

import aiohttp
import hypothesis
import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from otabox import jobspec
from otabox.errors import BadRequest
from otabox.models import Role
from otabox.protocol import VERSION_RE
from otabox.server import access
from otabox.server.http.openapi import document
from otabox.server.http.openapi.schemas import VERSION_PATTERN, components, job_body_schema
from tests.conftest import TOKEN, Server
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


def test_the_version_pattern_is_the_protocols() -> None:
    pattern = re.compile(VERSION_PATTERN)
    differ = [c for c in map(chr, range(sys.maxunicode + 1)) if bool(pattern.match(c)) != bool(VERSION_RE.fullmatch(c))]
    assert not differ, [hex(ord(c)) for c in differ[:10]]


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


# ---------------------------------------------------------------- fuzzing the running server

# Examples per operation and generation mode: the whole run stays around a minute on two cores.
FUZZ_EXAMPLES = 30


def body_rejection(ctx: Any, response: Any, case: Any) -> bool | None:
    """A body the document calls invalid is refused (4xx), not half-accepted. Only the body: unknown
    query parameters are ignored, as HTTP servers do (a cache-buster must not break a script)."""
    meta = case.meta
    negated = {loc for loc, info in meta.components.items() if info.mode.is_negative} if meta else set()
    if negated != {ParameterLocation.BODY}:
        return None
    result: bool | None = negative_data_rejection(ctx, response, case)
    return result


CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    body_rejection,
)


async def seed(server: Server) -> dict[str, dict[str, str]]:
    """One real object behind each path parameter, by path prefix: the fuzz reaches past the 404s."""
    pk = await server.product("thermo")
    secret = (await server.device("dev-001", pk))["deviceSecret"]
    assert secret
    fw = await server.firmware(pk, "2.0.0", b"\x01" * 2048)
    job = await server.call(
        "POST",
        "/jobs",
        201,
        json={"firmwareId": fw["id"], "scope": {"deviceKeys": ["dev-001"]}, "policy": "incremental"},
    )
    cert = await server.call("POST", f"/products/{pk}/devices/dev-001/certificates", 201, json={})
    hook = await server.call(
        "POST", "/webhooks", 201, json={"url": "http://127.0.0.1:9/x", "events": ["job.completed"], "secret": "s" * 16}
    )
    await server.call("POST", "/users", 201, json={"username": "ana", "role": "operator"})
    token = await server.call("POST", "/tokens", 201, json={"name": "ci"})
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    await server.call("POST", "/publishers", 201, json={"name": "acme", "publicKey": key.decode()})
    common = {"pk": pk, "dk": "dev-001", "serial": cert["serial"], "file": fw["fileName"], "from": fw["id"]}
    return {
        "/api/v1/firmware/": {**common, "id": fw["id"]},
        "/firmware/": {**common, "id": fw["id"]},
        "/api/v1/jobs/": {**common, "id": job["id"]},
        "/api/v1/webhooks/": {**common, "id": hook["id"]},
        "/api/v1/tokens/": {**common, "id": token["id"]},
        "/api/v1/users/": {**common, "name": "ana"},
        "/api/v1/publishers/": {**common, "name": "acme"},
        "": common,
    }


def fixed_parameters(seeded: dict[str, dict[str, str]], path: str) -> dict[str, str]:
    values = next(v for prefix, v in seeded.items() if path.startswith(prefix))
    return {name: values[name] for name in re.findall(r"\{([^}]+)\}", path)}


def fuzz(url: str, seeded: dict[str, dict[str, str]]) -> list[str]:
    """Every operation, with schema-valid and schema-breaking requests; one line per failing operation."""
    schema = schemathesis.openapi.from_dict(document())
    ops = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # an operation schemathesis cannot read is a failure too
        ops.append(result.ok())
    # Deletions last, so the other operations still find the seeded objects.
    ops.sort(key=lambda op: op.method.upper() == "DELETE")
    failures: list[str] = []
    for op in ops:
        for mode, fixed in ((GenerationMode.POSITIVE, True), (GenerationMode.NEGATIVE, False)):
            params = fixed_parameters(seeded, op.path) if fixed else None
            strategy = op.as_strategy(generation_mode=mode, path_parameters=params or None)

            @hypothesis.settings(
                max_examples=FUZZ_EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.given(case=strategy)
            def run(case: Any) -> None:
                case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, checks=list(CHECKS))

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE, op.path  # nothing to break: no parameter, no body
            except Exception as exc:
                failures.append(f"{op.method.upper()} {op.path} ({mode}): {str(exc)[:1500]}")
    return failures


@pytest.mark.timeout(240)
async def test_the_server_keeps_to_its_document_under_fuzzing(server: Server) -> None:
    seeded = await seed(server)
    failures = await asyncio.to_thread(fuzz, server.url, seeded)
    assert not failures, "\n\n".join(failures)


# ---------------------------------------------------------------- what the fuzz found, refused at the edge


async def test_refusals_found_by_the_fuzz_have_the_error_shape_and_store_nothing(server: Server) -> None:
    pk = await server.product("edge")

    async def refused(method: str, path: str, status: int = 400, **kw: Any) -> dict[str, Any]:
        async with server.http.request(method, server.url + "/api/v1" + path, **kw) as resp:
            body: dict[str, Any] = await resp.json()
            assert resp.status == status, body
            assert set(body["error"]) == {"code", "message"}, body
            return body

    await refused("POST", f"/products/{pk}/devices", json={"deviceKey": "d1", "colour": "red"})
    await refused("GET", f"/products/{pk}/devices/d1", 404)
    await refused("POST", "/tokens", json={"name": "forever", "expiresInSeconds": 1e300})
    tokens = await server.call("GET", "/tokens", 200)
    assert [t for t in tokens["items"] if t["name"] == "forever"] == []
    await refused("GET", "/products", params={"offset": str(2**70)})
    boundary = "b0undary"
    form = f'--{boundary}\r\nContent-Disposition: form-data; name="\u00f5N\x04"\r\n\r\nx\r\n--{boundary}--\r\n'
    await refused(
        "POST",
        f"/products/{pk}/firmware",
        data=form.encode(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert (await server.call("GET", f"/products/{pk}/firmware", 200))["total"] == 0
    # The body is checked before the firmware is looked up: the field at fault, not "no such firmware".
    body = await refused("POST", "/jobs", json={"firmwareId": "fw-none", "name": ["x"]})
    assert "name" in body["error"]["message"]
    async with server.http.put(server.url + "/api/v1/products") as resp:
        assert resp.status == 405
        assert set(resp.headers["Allow"].split(",")) >= {"GET", "POST"}
        assert (await resp.json())["error"]["code"] == "method-not-allowed"


def test_the_device_body_is_the_one_the_registry_takes() -> None:
    from otabox.server.registry import DEVICE_FIELDS

    op = document()["paths"]["/api/v1/products/{pk}/devices"]["post"]
    assert set(op["requestBody"]["content"]["application/json"]["schema"]["properties"]) == set(DEVICE_FIELDS)


# ---------------------------------------------------------------- the console's reference page


async def test_the_console_lists_every_operation_offline(server: Server) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:  # cookies for 127.0.0.1
        async with browser.post(server.url + "/ui/login", data={"token": TOKEN}, allow_redirects=False) as resp:
            assert resp.status == 303
        async with browser.get(server.url + "/ui/api") as resp:
            assert resp.status == 200
            page = await resp.text()
    for method, path in operations(document()):
        assert f'<code class="method">{method}</code> <code>{html.escape(path)}</code>' in page, (method, path)
    assert "Needs the <strong>operator</strong> role." in page
    assert 'id="model-JobBody"' in page and "<code>retry</code>" in page
    # Offline: nothing the page loads or links to lies outside this server.
    external = re.findall(r"""(?:src|href|action)\s*=\s*["']?((?:[a-z]+:)?//[^"' >]+)""", page, re.IGNORECASE)
    assert external == [], external
    assert "http://" not in page.replace(server.url, "") and "https://" not in page
