"""Management API and firmware downloads over real HTTP against a real server on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from otabox import protocol
from tests.conftest import TOKEN, Server, mqtt_client, request, wait_for

# The store behind these tests runs on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.both_backends

# Small enough that the 413 tests stay quick, large enough for a download that really breaks.
MAX_UPLOAD = 8 * 1024 * 1024


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"max_upload_bytes": MAX_UPLOAD}


async def call(server: Server, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    """(status, body) of an API call; body is JSON when the answer is JSON."""
    async with server.http.request(method, server.url + "/api/v1" + path, **kw) as resp:
        body = await resp.read()
        return resp.status, json.loads(body) if "json" in resp.content_type else body


def assert_error(status: int, body: Any, want_status: int, want_code: str | None = None) -> None:
    assert status == want_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if want_code is not None:
        assert body["error"]["code"] == want_code, body


def firmware_form(content: bytes | None = b"x", **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for k, v in fields.items():
        form.add_field(k, v)
    if content is not None:
        form.add_field("file", content, filename="fw.bin", content_type="application/octet-stream")
    return form


def stored_files(server: Server) -> list[str]:
    """Every file under <data>/firmware, relative; the tmp dir must be empty."""
    root = server.data_dir / "firmware"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def content(n: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes (so a wrong offset cannot match by luck)."""
    out = bytearray()
    block = seed.to_bytes(8, "big")
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


# ---------------------------------------------------------------- auth and error shape


async def test_api_requires_the_admin_token(server: Server) -> None:
    url = server.url + "/api/v1/products"
    async with aiohttp.ClientSession() as anon:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Bearer "}):
            async with anon.get(url, headers=headers) as resp:
                assert_error(resp.status, await resp.json(), 401, "unauthorized")
        # Even a write with a valid body is refused, and nothing is created.
        async with anon.post(url, json={"productKey": "p", "name": "p"}) as resp:
            assert resp.status == 401
        async with anon.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
            assert (await resp.json()) == {"items": [], "total": 0}
        # /healthz needs no token.
        async with anon.get(server.url + "/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"


async def test_unknown_route_and_bad_json_use_the_error_shape(server: Server) -> None:
    status, body = await call(server, "GET", "/nothing-here")
    assert_error(status, body, 404)
    status, body = await call(
        server, "POST", "/products", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(status, body, 400, "invalid")
    status, body = await call(server, "POST", "/products", json=["a list"])
    assert_error(status, body, 400, "invalid")


# ---------------------------------------------------------------- products


async def test_create_product_and_get_it(server: Server) -> None:
    status, body = await call(server, "POST", "/products", json={"productKey": "thermo", "name": "Thermostat"})
    assert status == 201, body
    assert body["productKey"] == "thermo" and body["name"] == "Thermostat"
    assert body["createdAt"].endswith("Z")
    shown = await server.call("GET", "/products/thermo", 200)
    assert shown["name"] == "Thermostat" and shown["devices"] == 0
    # name defaults to the key
    assert (await server.call("POST", "/products", 201, json={"productKey": "bare"}))["name"] == "bare"


async def test_product_list_paging(server: Server) -> None:
    keys = [f"p{i:02d}" for i in range(7)]
    for pk in reversed(keys):
        await server.call("POST", "/products", 201, json={"productKey": pk, "name": pk.upper()})
    everything = await server.call("GET", "/products", 200)
    assert everything["total"] == 7 and [p["productKey"] for p in everything["items"]] == keys
    first = await server.call("GET", "/products?limit=3", 200)
    assert first["total"] == 7 and [p["productKey"] for p in first["items"]] == keys[:3]
    middle = await server.call("GET", "/products?limit=3&offset=3", 200)
    assert [p["productKey"] for p in middle["items"]] == keys[3:6]
    last = await server.call("GET", "/products?limit=3&offset=6", 200)
    assert [p["productKey"] for p in last["items"]] == keys[6:] and last["total"] == 7
    beyond = await server.call("GET", "/products?offset=100", 200)
    assert beyond == {"items": [], "total": 7}
    for bad in ("limit=0", "limit=abc", "offset=-1", "limit=100000"):
        status, body = await call(server, "GET", f"/products?{bad}")
        assert_error(status, body, 400, "invalid")


async def test_duplicate_product_is_409(server: Server) -> None:
    await server.call("POST", "/products", 201, json={"productKey": "dup", "name": "one"})
    status, body = await call(server, "POST", "/products", json={"productKey": "dup", "name": "two"})
    assert_error(status, body, 409)
    assert "dup" in body["error"]["message"]
    assert (await server.call("GET", "/products/dup", 200))["name"] == "one"


@pytest.mark.parametrize("key", ["a/b", "+", "#", "", " ", "a b", "x" * 65, "sys/+/#", 42, None, "é", "abc\n"])
async def test_bad_product_key_is_400_naming_the_field(server: Server, key: Any) -> None:
    status, body = await call(server, "POST", "/products", json={"productKey": key, "name": "n"})
    assert_error(status, body, 400, "invalid")
    assert "productKey" in body["error"]["message"]
    assert (await server.call("GET", "/products", 200))["total"] == 0


async def test_longest_valid_key_is_accepted(server: Server) -> None:
    key = "A-z_0.9" + "k" * 57
    assert len(key) == 64
    await server.call("POST", "/products", 201, json={"productKey": key, "name": "n"})
    await server.call("POST", f"/products/{key}/devices", 201, json={"deviceKey": key})


async def test_unknown_product_is_404(server: Server) -> None:
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/products/nope", {}),
        ("GET", "/products/nope/devices", {}),
        ("GET", "/products/nope/devices/d1", {}),
        ("POST", "/products/nope/devices", {"json": {"deviceKey": "d1"}}),
        ("POST", "/products/nope/devices:import", {"json": [{"deviceKey": "d1"}]}),
        ("GET", "/products/nope/firmware", {}),
        ("POST", "/products/nope/firmware", {"data": firmware_form(name="n", version="1")}),
    ]
    for method, path, kw in cases:
        status, body = await call(server, method, path, **kw)
        assert_error(status, body, 404, "not-found")
    assert stored_files(server) == []


# ---------------------------------------------------------------- devices


async def test_create_device_returns_the_secret_once(server: Server) -> None:
    await server.product("pk1")
    status, dev = await call(
        server, "POST", "/products/pk1/devices", json={"deviceKey": "d1", "tags": {"site": "east"}}
    )
    assert status == 201, dev
    secret = dev["deviceSecret"]
    assert isinstance(secret, str) and len(secret) >= 16
    assert dev["deviceKey"] == "d1" and dev["tags"] == {"site": "east"}
    assert dev["version"] is None and dev["online"] is False
    shown = await server.call("GET", "/products/pk1/devices/d1", 200)
    listed = await server.call("GET", "/products/pk1/devices", 200)
    for obj in (shown, *listed["items"]):
        assert "deviceSecret" not in obj and secret not in json.dumps(obj)
    assert shown["currentTask"] is None
    assert set(listed["items"][0]) >= {"deviceKey", "version", "online", "lastSeen", "tags"}
    # Each device gets its own generated secret; a given one is used as is.
    other = await server.call("POST", "/products/pk1/devices", 201, json={"deviceKey": "d2"})
    assert other["deviceSecret"] != secret
    given = await server.call(
        "POST", "/products/pk1/devices", 201, json={"deviceKey": "d3", "deviceSecret": "s3cret-s3cret"}
    )
    assert given["deviceSecret"] == "s3cret-s3cret"
    # The returned secret is the one the broker checks.
    async with mqtt_client(server, "pk1", "d3", "s3cret-s3cret") as c:
        assert (await request(c, "pk1", "d3", protocol.INFORM, {"version": "1"}))["code"] == 200


async def test_device_errors(server: Server) -> None:
    await server.device("d1")
    status, body = await call(server, "POST", "/products/pk1/devices", json={"deviceKey": "d1"})
    assert_error(status, body, 409)
    for bad in (
        {"deviceKey": "a/b"},
        {"deviceKey": "+"},
        {"deviceKey": "d9\n"},
        {"deviceKey": ""},
        {},
        {"deviceKey": "ok", "deviceSecret": "short"},
        {"deviceKey": "ok", "tags": ["x"]},
        {"deviceKey": "ok", "auth": "magic"},
    ):
        status, body = await call(server, "POST", "/products/pk1/devices", json=bad)
        assert_error(status, body, 400, "invalid")
    status, body = await call(server, "GET", "/products/pk1/devices/nobody")
    assert_error(status, body, 404, "not-found")
    assert (await server.call("GET", "/products/pk1/devices", 200))["total"] == 1


async def test_device_list_filters(server: Server) -> None:
    a = await server.device("a", tags={"site": "east", "rack": "1"})
    b = await server.device("b", tags={"site": "west"})
    await server.device("c", tags={"site": "east"})

    async def keys(query: str) -> list[str]:
        data = await server.call("GET", "/products/pk1/devices" + query, 200)
        assert data["total"] == len(data["items"])
        return [d["deviceKey"] for d in data["items"]]

    async with mqtt_client(server, "pk1", "a", a["deviceSecret"]) as ca:
        assert (await request(ca, "pk1", "a", protocol.INFORM, {"version": "1.0.0"}))["code"] == 200
        async with mqtt_client(server, "pk1", "b", b["deviceSecret"]) as cb:
            assert (await request(cb, "pk1", "b", protocol.INFORM, {"version": "2.0.0"}))["code"] == 200
        # b has disconnected; a is still online.
        assert await keys("") == ["a", "b", "c"]
        assert await keys("?version=1.0.0") == ["a"]
        assert await keys("?version=2.0.0") == ["b"]
        assert await keys("?version=9") == []
        assert await keys("?tag=site:east") == ["a", "c"]
        assert await keys("?tag=site:east&tag=rack:1") == ["a"]
        assert await keys("?tag=site:north") == []
        assert await keys("?online=true") == ["a"]
        assert await keys("?online=false") == ["b", "c"]
        assert await keys("?online=true&tag=site:west") == []
        assert await keys("?tag=site:east&online=false&limit=1") == ["c"]
        paged = await server.call("GET", "/products/pk1/devices?limit=2&offset=1", 200)
        assert [d["deviceKey"] for d in paged["items"]] == ["b", "c"] and paged["total"] == 3
        shown = await server.call("GET", "/products/pk1/devices/a", 200)
        assert shown["online"] is True and shown["version"] == "1.0.0" and shown["lastSeen"].endswith("Z")
    for bad in ("?tag=nocolon", "?online=maybe"):
        status, body = await call(server, "GET", "/products/pk1/devices" + bad)
        assert_error(status, body, 400, "invalid")


# ---------------------------------------------------------------- bulk import


async def test_import_json_with_per_row_errors(server: Server) -> None:
    await server.device("old")
    rows = [
        {"deviceKey": "j1", "deviceSecret": "secret-j1-long", "tags": {"site": "east"}},
        {"deviceKey": "j2"},
        {"deviceKey": "a/b", "deviceSecret": "whatever-long"},
        {"deviceKey": "j1", "deviceSecret": "another-long-one"},
        {"deviceKey": "old"},
        {"deviceKey": "j3", "deviceSecret": "short"},
        "not an object",
        {"deviceKey": "j4", "auth": "plain", "deviceSecret": "plain-secret"},
    ]
    result = await server.call("POST", "/products/pk1/devices:import", 200, json=rows)
    assert result["created"] == 3 and result["rejected"] == 5
    assert [(e["row"], e["deviceKey"]) for e in result["errors"]] == [
        (3, "a/b"),
        (4, "j1"),
        (5, "old"),
        (6, "j3"),
        (7, None),
    ]
    reasons = {e["row"]: e["reason"] for e in result["errors"]}
    assert "deviceKey" in reasons[3]
    assert "twice" in reasons[4]
    assert "exists" in reasons[5]
    assert "deviceSecret" in reasons[6]
    secrets = {d["deviceKey"]: d["deviceSecret"] for d in result["devices"]}
    assert secrets["j1"] == "secret-j1-long" and secrets["j4"] == "plain-secret" and len(secrets["j2"]) >= 16
    listed = await server.call("GET", "/products/pk1/devices", 200)
    assert [d["deviceKey"] for d in listed["items"]] == ["j1", "j2", "j4", "old"]
    assert (await server.call("GET", "/products/pk1/devices/j1", 200))["tags"] == {"site": "east"}
    assert (await server.call("GET", "/products/pk1/devices/j4", 200))["auth"] == "plain"
    # A generated secret returned by the import is the one the broker checks.
    async with mqtt_client(server, "pk1", "j2", secrets["j2"]) as c:
        assert (await request(c, "pk1", "j2", protocol.INFORM, {"version": "1"}))["code"] == 200


async def test_import_csv_extra_columns_become_tags(server: Server) -> None:
    await server.device("old")
    csv_text = (
        "deviceKey,deviceSecret,site,rack\n"
        "c1,secret-c1-long,east,r1\n"
        "c2,,west,\n"
        "\n"
        "bad key,secret-long-enough,east,r2\n"
        "c1,secret-c1-again,east,r3\n"
        "old,secret-old-long,east,r4\n"
        "c3,tiny,east,r5\n"
        "c4,secret-c4-long\n"
    )
    result = await server.call(
        "POST", "/products/pk1/devices:import", 200, data=csv_text.encode(), headers={"Content-Type": "text/csv"}
    )
    assert result["created"] == 3 and result["rejected"] == 4, result
    assert sorted(e["deviceKey"] for e in result["errors"]) == ["bad key", "c1", "c3", "old"]
    secrets = {d["deviceKey"]: d["deviceSecret"] for d in result["devices"]}
    assert secrets["c1"] == "secret-c1-long" and len(secrets["c2"]) >= 16 and secrets["c4"] == "secret-c4-long"
    assert (await server.call("GET", "/products/pk1/devices/c1", 200))["tags"] == {"site": "east", "rack": "r1"}
    assert (await server.call("GET", "/products/pk1/devices/c2", 200))["tags"] == {"site": "west"}
    assert (await server.call("GET", "/products/pk1/devices/c4", 200))["tags"] == {}
    east = await server.call("GET", "/products/pk1/devices?tag=site:east", 200)
    assert [d["deviceKey"] for d in east["items"]] == ["c1"]
    async with mqtt_client(server, "pk1", "c2", secrets["c2"]) as c:
        assert (await request(c, "pk1", "c2", protocol.INFORM, {"version": "1"}))["code"] == 200


async def test_import_csv_from_a_spreadsheet_with_bom_and_crlf(server: Server) -> None:
    # Spreadsheet programs save "CSV UTF-8" with a byte order mark and CRLF line ends.
    await server.product("pk1")
    data = "\ufeffdeviceKey,deviceSecret,site\r\ns1,secret-s1-long,east\r\n".encode()
    result = await server.call(
        "POST", "/products/pk1/devices:import", 200, data=data, headers={"Content-Type": "text/csv"}
    )
    assert (result["created"], result["rejected"]) == (1, 0), result
    assert (await server.call("GET", "/products/pk1/devices/s1", 200))["tags"] == {"site": "east"}


async def test_import_csv_without_header_and_bad_bodies(server: Server) -> None:
    await server.product("pk1")
    result = await server.call(
        "POST",
        "/products/pk1/devices:import",
        200,
        data=b"h1,secret-h1-long\nh2\n",
        headers={"Content-Type": "text/csv"},
    )
    assert (result["created"], result["rejected"]) == (2, 0)
    empty = await server.call(
        "POST", "/products/pk1/devices:import", 200, data=b"", headers={"Content-Type": "text/csv"}
    )
    assert (empty["created"], empty["rejected"], empty["devices"]) == (0, 0, [])
    for data, ctype in ((b"[not json", "application/json"), (b'{"deviceKey": "x"}', "application/json")):
        status, body = await call(
            server, "POST", "/products/pk1/devices:import", data=data, headers={"Content-Type": ctype}
        )
        assert_error(status, body, 400, "invalid")


# ---------------------------------------------------------------- firmware upload


@pytest.mark.parametrize("sign_method", [None, "sha256", "md5"])
async def test_upload_firmware_digests_and_sign(server: Server, sign_method: str | None) -> None:
    await server.product("pk1")
    blob = content(300_000, seed=1)
    fields = {"name": "main-fw", "version": "2.0.0", "desc": "release notes"}
    if sign_method:
        fields["signMethod"] = sign_method
    status, fw = await call(server, "POST", "/products/pk1/firmware", data=firmware_form(blob, **fields))
    assert status == 201, fw
    assert fw["id"] and fw["name"] == "main-fw" and fw["version"] == "2.0.0" and fw["desc"] == "release notes"
    assert fw["size"] == len(blob)
    assert fw["md5"] == hashlib.md5(blob).hexdigest()
    assert fw["sha256"] == hashlib.sha256(blob).hexdigest()
    assert fw["signMethod"] == (sign_method or "sha256")
    assert fw["sign"] == (fw["md5"] if sign_method == "md5" else fw["sha256"])
    assert fw["status"] == "unverified"
    assert fw["enableVerification"] is False and fw["minSuccessForVerified"] == 1
    assert await server.call("GET", f"/firmware/{fw['id']}", 200) == fw
    assert (await server.call("GET", "/products/pk1/firmware", 200)) == {"items": [fw], "total": 1}
    # Stored once, by content hash.
    sha = fw["sha256"]
    assert stored_files(server) == [f"{sha[:2]}/{sha}"]
    assert (server.data_dir / "firmware" / sha[:2] / sha).read_bytes() == blob


async def test_upload_options(server: Server) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "1.0", b"abc", enableVerification="true", minSuccessForVerified="3")
    assert fw["enableVerification"] is True and fw["minSuccessForVerified"] == 3
    assert fw["size"] == 3
    status, body = await call(
        server, "POST", "/products/pk1/firmware", data=firmware_form(name="n", version="2", minSuccessForVerified="11")
    )
    assert_error(status, body, 400, "invalid")


async def test_a_firmware_line_holds_many_versions_each_once(server: Server) -> None:
    await server.product("pk1")
    await server.product("pk2")
    first = await server.firmware("pk1", "1.0.0", b"one", name="main")
    # The name is the firmware line: more versions of it, and the same version in another line, are fine.
    await server.firmware("pk1", "1.0.1", b"two", name="main")
    await server.firmware("pk1", "1.0.0", b"three", name="other")
    status, body = await call(
        server, "POST", "/products/pk1/firmware", data=firmware_form(b"four", name="main", version="1.0.0")
    )
    assert_error(status, body, 409)
    assert "main 1.0.0" in body["error"]["message"]
    # The same name and version are fine in another product.
    again = await server.firmware("pk2", "1.0.0", b"one", name="main")
    assert again["sha256"] == first["sha256"] and again["id"] != first["id"]
    assert (await server.call("GET", "/products/pk1/firmware", 200))["total"] == 3
    # The refused upload left no file behind; shared content is stored once.
    assert len(stored_files(server)) == 3


async def test_empty_firmware_and_control_characters_are_refused(server: Server) -> None:
    await server.product("pk1")
    for fields, blob, field in (
        ({"name": "n", "version": "1"}, b"", "empty"),
        ({"name": "n\x00x", "version": "1"}, b"x", "name"),
        ({"name": "n", "version": "1\x1b[2J"}, b"x", "version"),
        ({"name": "n", "version": "1", "desc": "a\x00b"}, b"x", "desc"),
    ):
        status, body = await call(server, "POST", "/products/pk1/firmware", data=firmware_form(blob, **fields))
        assert_error(status, body, 400, "invalid")
        assert field in body["error"]["message"]
    ok = await server.firmware("pk1", "1", b"x", name="n", desc="line one\n\tline two")
    assert ok["desc"] == "line one\n\tline two"
    assert (await server.call("GET", "/products/pk1/firmware", 200))["total"] == 1
    assert len(stored_files(server)) == 1


@pytest.mark.parametrize(
    ("fields", "with_file", "field"),
    [
        ({"name": "n", "version": "1"}, False, "file"),
        ({"version": "1"}, True, "name"),
        ({"name": "n"}, True, "version"),
        ({"name": "", "version": "1"}, True, "name"),
        ({"name": "n", "version": ""}, True, "version"),
        ({"name": "n", "version": "x" * 65}, True, "version"),
        ({"name": "n", "version": "1\n2"}, True, "version"),
        ({"name": "n", "version": "1.0\n"}, True, "version"),
        ({"name": "n", "version": "1", "signMethod": "sha1"}, True, "signMethod"),
        ({"name": "n", "version": "1", "enableVerification": "perhaps"}, True, "enableVerification"),
    ],
)
async def test_upload_firmware_400(server: Server, fields: dict[str, str], with_file: bool, field: str) -> None:
    await server.product("pk1")
    form = firmware_form(b"some firmware" if with_file else None, **fields)
    status, body = await call(server, "POST", "/products/pk1/firmware", data=form)
    assert_error(status, body, 400, "invalid")
    assert field in body["error"]["message"]
    assert (await server.call("GET", "/products/pk1/firmware", 200))["total"] == 0
    assert stored_files(server) == []


async def test_upload_must_be_multipart(server: Server) -> None:
    await server.product("pk1")
    status, body = await call(server, "POST", "/products/pk1/firmware", json={"name": "n", "version": "1"})
    assert_error(status, body, 400, "invalid")


async def test_upload_larger_than_limit_is_413_and_stores_nothing(server: Server) -> None:
    await server.product("pk1")
    status, body = await call(
        server,
        "POST",
        "/products/pk1/firmware",
        data=firmware_form(content(MAX_UPLOAD + 1024 * 1024), name="big", version="1"),
    )
    assert_error(status, body, 413, "too-large")
    assert await server.call("GET", "/products/pk1/firmware", 200) == {"items": [], "total": 0}
    assert stored_files(server) == []
    assert [p.name for p in (server.data_dir / "firmware").iterdir()] == ["tmp"]


async def test_streamed_upload_larger_than_limit_is_413_and_stores_nothing(server: Server) -> None:
    # Chunked transfer: no Content-Length, so the limit is enforced while streaming to disk.
    await server.product("pk1")
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="version"\r\n\r\n1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="fw.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    chunk = content(256 * 1024)

    async def body() -> AsyncIterator[bytes]:
        yield head
        for _ in range((MAX_UPLOAD // len(chunk)) + 2):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    status, answer = await call(
        server,
        "POST",
        "/products/pk1/firmware",
        data=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_error(status, answer, 413, "too-large")
    assert await server.call("GET", "/products/pk1/firmware", 200) == {"items": [], "total": 0}
    assert stored_files(server) == []
    # An upload just under the limit, streamed the same way, is accepted.
    fw = await server.firmware("pk1", "2", content(MAX_UPLOAD - 1024))
    assert fw["size"] == MAX_UPLOAD - 1024


async def test_delete_firmware(server: Server) -> None:
    await server.product("pk1")
    await server.product("pk2")
    shared = content(1000, seed=2)
    a = await server.firmware("pk1", "1", shared)
    b = await server.firmware("pk2", "1", shared)
    c = await server.firmware("pk1", "2", b"unique")
    path_shared = server.data_dir / "firmware" / a["sha256"][:2] / a["sha256"]
    path_c = server.data_dir / "firmware" / c["sha256"][:2] / c["sha256"]
    assert path_shared.exists() and path_c.exists()

    assert await server.call("DELETE", f"/firmware/{c['id']}", 204) == b""
    status, body = await call(server, "GET", f"/firmware/{c['id']}")
    assert_error(status, body, 404, "not-found")
    status, body = await call(server, "DELETE", f"/firmware/{c['id']}")
    assert_error(status, body, 404, "not-found")
    assert not path_c.exists()

    # Content shared with another firmware stays until its last user is deleted.
    await server.call("DELETE", f"/firmware/{a['id']}", 204)
    assert path_shared.exists()
    assert (await server.call("GET", f"/firmware/{b['id']}", 200))["sha256"] == a["sha256"]
    await server.call("DELETE", f"/firmware/{b['id']}", 204)
    assert not path_shared.exists()
    assert stored_files(server) == []
    assert (await server.call("GET", "/products/pk1/firmware", 200))["total"] == 0
    # A deleted version can be uploaded again.
    await server.firmware("pk1", "1", shared)


# ---------------------------------------------------------------- downloads


async def file_url(server: Server, fw: dict[str, Any], dk: str) -> str:
    data = await server.call("GET", f"/firmware/{fw['id']}/url?deviceKey={dk}", 200)
    url: str = data["fileUrl"]
    return url


def with_token(url: str, token: str) -> str:
    return url.split("?", 1)[0] + "?token=" + token


async def test_firmware_url_shape_and_errors(server: Server) -> None:
    await server.device("d1")
    fw = await server.firmware("pk1", "2.0.0", b"payload", name="main-fw")
    url = await file_url(server, fw, "d1")
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == server.url
    assert parts.path == f"/firmware/{fw['id']}/main-fw-2.0.0-{fw['sha256'][:12]}.bin"
    assert parts.query.startswith("token=")
    for query, want in (("deviceKey=nobody", 404), ("deviceKey=a/b", 400), ("", 400)):
        status, body = await call(server, "GET", f"/firmware/{fw['id']}/url?{query}")
        assert_error(status, body, want)
    status, body = await call(server, "GET", "/firmware/fw-nope/url?deviceKey=d1")
    assert_error(status, body, 404, "not-found")


async def test_download_full_head_etag_and_accounting(server: Server) -> None:
    await server.device("d1")
    await server.device("d2")
    blob = content(200_000, seed=3)
    fw = await server.firmware("pk1", "2.0.0", blob)
    url = await file_url(server, fw, "d1")
    async with aiohttp.ClientSession() as anon:
        async with anon.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == blob
            assert resp.headers["Content-Length"] == str(len(blob))
            assert resp.headers.get("Accept-Ranges") == "bytes"
            etag = resp.headers["ETag"]
            assert etag
        async with anon.head(url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(blob))
            assert resp.headers["ETag"] == etag
            assert await resp.read() == b""
        async with anon.get(url, headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304 and await resp.read() == b""
        async with anon.get(url, headers={"Range": "bytes=100-"}) as resp:
            assert resp.status == 206
            assert await resp.read() == blob[100:]
            assert resp.headers["Content-Range"] == f"bytes 100-{len(blob) - 1}/{len(blob)}"
        async with anon.get(url, headers={"Range": "bytes=0-99"}) as resp:
            assert resp.status == 206 and await resp.read() == blob[:100]
        # d2's download is counted for d2 only.
        async with anon.get(await file_url(server, fw, "d2")) as resp:
            assert resp.status == 200 and await resp.read() == blob
    # full + tail + first 100; HEAD and 304 carry no body and count nothing. The count is
    # written once the body has been handed to the socket, so the client may see it first.
    await wait_for_bytes(server, "d1", fw["id"], len(blob) + (len(blob) - 100) + 100)
    await wait_for_bytes(server, "d2", fw["id"], len(blob))


async def wait_for_bytes(server: Server, dk: str, fw_id: str, want: int) -> None:
    async def counted() -> bool:
        got = await server.store.downloaded_bytes("pk1", dk, fw_id)
        assert got <= want, (got, want)
        return got == want

    await wait_for(counted, timeout=5)


async def test_broken_download_resumes_with_range(server: Server) -> None:
    await server.device("d1")
    # Larger than the loopback socket buffers, so the server really sees the abort.
    blob = content(6 * 1024 * 1024, seed=4)
    fw = await server.firmware("pk1", "2.0.0", blob)
    url = await file_url(server, fw, "d1")
    async with aiohttp.ClientSession() as anon:
        resp = await anon.get(url)
        assert resp.status == 200
        got = await resp.content.readexactly(512 * 1024)
        resp.close()  # drop the connection mid-body, as a device losing its link would
        async with anon.get(url, headers={"Range": f"bytes={len(got)}-"}) as resumed:
            assert resumed.status == 206
            assert resumed.headers["Content-Range"] == f"bytes {len(got)}-{len(blob) - 1}/{len(blob)}"
            rest = await resumed.read()
    assert hashlib.sha256(got + rest).hexdigest() == fw["sha256"]
    # The server keeps serving after the abort.
    async with aiohttp.ClientSession() as anon, anon.get(url) as resp:
        assert await resp.read() == blob


async def test_download_token_is_required_and_checked(server: Server) -> None:
    await server.device("d1")
    fw = await server.firmware("pk1", "1.0", b"firmware one", name="one")
    other = await server.firmware("pk1", "2.0", b"firmware two", name="two")
    url = await file_url(server, fw, "d1")
    token = url.split("token=", 1)[1]
    body, _, sig = token.partition(".")
    flipped_sig = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    flipped_body = ("A" if body[0] != "A" else "B") + body[1:]
    other_token = (await file_url(server, other, "d1")).split("token=", 1)[1]
    expired = server.services.keys.download_token(fw["id"], "pk1", "d1", ttl=-1)
    async with aiohttp.ClientSession() as anon:
        for bad_url in (url.split("?", 1)[0], with_token(url, "")):
            async with anon.get(bad_url) as resp:
                assert_error(resp.status, await resp.json(), 401, "unauthorized")
        bad_tokens = (f"{body}.{flipped_sig}", f"{flipped_body}.{sig}", f"{body}.{sig[:-1]}é", "é.é", "garbage", "a.b")
        for bad in (*bad_tokens, other_token, expired):
            async with anon.get(with_token(url, bad)) as resp:
                assert_error(resp.status, await resp.json(), 403, "forbidden")
            async with anon.head(with_token(url, bad)) as resp:
                assert resp.status == 403
        # A good token on a wrong file name or unknown firmware is 404.
        async with anon.get(url.replace(".bin?", "x.bin?")) as resp:
            assert_error(resp.status, await resp.json(), 404)
        async with anon.get(url) as resp:
            assert resp.status == 200 and await resp.read() == b"firmware one"
    await wait_for_bytes(server, "d1", fw["id"], len(b"firmware one"))
    assert await server.store.downloaded_bytes("pk1", "d1", other["id"]) == 0


async def test_download_token_expires(server: Server) -> None:
    await server.device("d1")
    fw = await server.firmware("pk1", "1.0", b"fw")
    good = server.services.keys.download_token(fw["id"], "pk1", "d1", ttl=60)
    gone = server.services.keys.download_token(fw["id"], "pk1", "d1", ttl=-1)
    url = await file_url(server, fw, "d1")
    async with aiohttp.ClientSession() as anon:
        async with anon.get(with_token(url, good)) as resp:
            assert resp.status == 200
        async with anon.get(with_token(url, gone)) as resp:
            assert_error(resp.status, await resp.json(), 403, "forbidden")
            assert "expired" in (await resp.json())["error"]["message"]


async def test_download_of_deleted_firmware_is_404(server: Server) -> None:
    await server.device("d1")
    fw = await server.firmware("pk1", "1.0", b"soon gone")
    url = await file_url(server, fw, "d1")
    await server.call("DELETE", f"/firmware/{fw['id']}", 204)
    async with aiohttp.ClientSession() as anon, anon.get(url) as resp:
        assert_error(resp.status, await resp.json(), 404, "not-found")


async def test_import_larger_than_one_mebibyte(server: Server) -> None:
    # MAX_IMPORT_ROWS allows 100,000 devices; their CSV is far larger than the app's 1 MiB body limit.
    await server.product("pk1")
    n = 5_000
    lines = ["deviceKey,deviceSecret,site,rack"]
    lines += [f"{i:06d}-{'k' * 57},{i:06d}-{'s' * 121},east-{'e' * 10},rack-{i % 7}" for i in range(n)]
    data = "\n".join(lines).encode()
    assert len(data) > 1024**2
    result = await server.call(
        "POST", "/products/pk1/devices:import", 200, data=data, headers={"Content-Type": "text/csv"}
    )
    assert (result["created"], result["rejected"]) == (n, 0)
    assert (await server.call("GET", "/products/pk1/devices?limit=1", 200))["total"] == n


# ---------------------------------------------------------------- download connections (once broken in web.py)


async def _raw_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str) -> tuple[int, bytes]:
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    return status, await reader.readexactly(length)


async def test_download_keeps_the_connection_alive_and_logs_nothing(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    await server.device("d1")
    fw = await server.firmware("pk1", "1.0", b"firmware bytes")
    url = urlsplit(await file_url(server, fw, "d1"))
    target = f"{url.path}?{url.query}"
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        async with asyncio.timeout(10):
            assert await _raw_get(reader, writer, target) == (200, b"firmware bytes")
            # A device resuming or re-checking on the same connection must be answered.
            assert await _raw_get(reader, writer, target) == (200, b"firmware bytes")
    finally:
        writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_dropped_download_is_not_logged_as_an_error(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    await server.device("d1")
    blob = content(6 * 1024 * 1024, seed=5)
    fw = await server.firmware("pk1", "1.0", blob)
    url = urlsplit(await file_url(server, fw, "d1"))
    sock = socket.socket()
    # A tiny receive window keeps most of the file on the server's side of the connection.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (url.hostname, url.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(64 * 1024)
    # Reset, not a polite close: what a device that lost power or signal leaves behind.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()

    def error_logged() -> bool:
        return any(r.levelno >= logging.ERROR for r in caplog.records)

    async def logged() -> bool:
        return error_logged()

    # The abort ends inside aiohttp with no event to wait for, so absence is shown by a bounded
    # wait; the error this guards against (an ERROR traceback per dropped download) came within ms.
    with contextlib.suppress(TimeoutError):
        await wait_for(logged, timeout=1)
    assert not error_logged(), [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_no_signing_key_means_no_signature(server: Server) -> None:
    await server.device("d1")
    fw = await server.firmware("pk1", "1.0", b"unsigned")
    assert "signature" not in fw
    err = await server.call("GET", "/signing-key", 404)
    assert "signing_key" in err["error"]["message"]


async def test_import_headers_are_recognised_or_refused_and_never_imported(server: Server) -> None:
    await server.product("pk1")

    async def imp(text: str) -> tuple[int, Any]:
        return await call(
            server, "POST", "/products/pk1/devices:import", data=text.encode(), headers={"Content-Type": "text/csv"}
        )

    # Usual spellings and a semicolon-separated spreadsheet export.
    status, body = await imp("Device_Key;Secret;site\nh1;secret-h1-long;east\n")
    assert status == 200 and body["created"] == 1, body
    assert body["columns"]["delimiter"] == ";" and body["columns"]["understood"] == {
        "deviceKey": "Device_Key", "deviceSecret": "Secret",
    }  # fmt: skip
    assert body["columns"]["tags"] == ["site"]
    assert (await server.call("GET", "/products/pk1/devices/h1", 200))["tags"] == {"site": "east"}
    # A header otabox does not understand is refused, naming its columns; nothing is created.
    status, body = await imp("serial,secret,site\ns1,secret-s1-long,east\n")
    assert_error(status, body, 400, "invalid")
    assert "serial" in body["error"]["message"] and "deviceKey" in body["error"]["message"]
    status, body = await imp("Geräte-ID,Passwort\nx1,secret-x1-long\n")
    assert_error(status, body, 400, "invalid")
    # Not UTF-8, and a field over the csv module's limit: 400, not 500.
    status, body = await call(
        server,
        "POST",
        "/products/pk1/devices:import",
        data=b"deviceKey\n\xff\xfe\n",
        headers={"Content-Type": "text/csv"},
    )
    assert_error(status, body, 400, "invalid")
    status, body = await imp('deviceKey\n"' + "x" * 200_000 + '"\n')
    assert_error(status, body, 400, "invalid")
    # Without a header the first cell is a device key: still supported.
    status, body = await imp("n1,secret-n1-long\n")
    assert status == 200 and body["created"] == 1 and body["columns"]["header"] is False
    assert (await server.call("GET", "/products/pk1/devices", 200))["total"] == 2
