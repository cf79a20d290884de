"""Users, roles, personal tokens and the audit log, over the real API and the real console."""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import Server
from tests.test_cli import Cli, _clean_env  # noqa: F401  (the CLI must not read the shell's settings)

# The store behind these tests runs on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.both_backends


async def as_user(server: Server, username: str, role: str, password: str = "correct horse battery") -> str:
    """Create a user and return a personal token of theirs (got with HTTP Basic, as a script would)."""
    await server.call("POST", "/users", 201, json={"username": username, "role": role, "password": password})
    basic = base64.b64encode(f"{username}:{password}".encode()).decode()
    async with (
        aiohttp.ClientSession() as plain,
        plain.post(
            server.url + "/api/v1/tokens", json={"name": "script"}, headers={"Authorization": f"Basic {basic}"}
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        token: str = (await resp.json())["token"]
    return token


async def call(server: Server, token: str, method: str, path: str, expect: int, **kw: Any) -> Any:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http,
        http.request(method, server.url + "/api/v1" + path, **kw) as resp,
    ):
        body = await resp.read()
        assert resp.status == expect, (method, path, resp.status, body[:300])
        return json.loads(body) if body and resp.content_type == "application/json" else body


async def audit(server: Server, **query: str) -> list[dict[str, Any]]:
    text = await server.call("GET", "/audit", 200, params=query)
    return [json.loads(line) for line in text.decode().splitlines()]


async def test_a_viewer_reads_but_every_write_is_403(server: Server) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"\x01" * 1000)
    await server.device("d1")
    viewer = await as_user(server, "vera", "viewer")
    assert (await call(server, viewer, "GET", "/jobs", 200))["total"] == 0
    assert (await call(server, viewer, "GET", "/products/pk1/devices", 200))["total"] == 1
    writes = [
        ("POST", "/jobs", {"json": {"firmwareId": fw["id"]}}),
        ("DELETE", f"/firmware/{fw['id']}", {}),
        ("POST", "/products", {"json": {"productKey": "pk2", "name": "x"}}),
        ("POST", "/products/pk1/devices", {"json": {"deviceKey": "d2"}}),
        ("POST", "/users", {"json": {"username": "x", "role": "admin"}}),
        ("POST", "/backup", {}),
    ]
    for method, path, kw in writes:
        refused = await call(server, viewer, method, path, 403, **kw)
        assert refused["error"]["code"] == "forbidden" and "vera is viewer" in refused["error"]["message"]
    await call(server, viewer, "GET", "/users", 403)
    await call(server, viewer, "GET", "/audit", 403)
    assert (await server.call("GET", "/jobs", 200))["total"] == 0  # nothing happened
    refused = [e for e in await audit(server, actor="vera") if e["status"] == 403]
    assert [e["action"] for e in refused] == [
        "job.create", "firmware.delete", "product.create", "device.create", "user.add", "backup.create",
    ]  # fmt: skip


async def test_an_operator_runs_a_rollout_but_cannot_manage_users(server: Server) -> None:
    await server.product("pk1")
    await server.device("d1")
    operator = await as_user(server, "otto", "operator")
    form = aiohttp.FormData()
    for k, v in {"name": "fw", "version": "2.0"}.items():
        form.add_field(k, v)
    form.add_field("file", b"\x02" * 1000, filename="fw.bin")
    fw = await call(server, operator, "POST", "/products/pk1/firmware", 201, data=form)
    job = await call(server, operator, "POST", "/jobs", 201, json={"firmwareId": fw["id"]})
    await call(server, operator, "POST", f"/jobs/{job['id']}/pause", 200)
    await call(server, operator, "POST", f"/jobs/{job['id']}/resume", 200)
    await call(server, operator, "POST", f"/jobs/{job['id']}/cancel", 200)
    await call(server, operator, "POST", "/users", 403, json={"username": "x", "role": "viewer"})
    await call(server, operator, "POST", "/products/pk1/devices", 403, json={"deviceKey": "d9"})
    # The upgrade log names the operator, the audit log has each action with its actor.
    log = (await server.call("GET", f"/events?jobId={job['id']}")).decode().splitlines()
    actors = {json.loads(line).get("actor") for line in log if json.loads(line)["kind"] == "job"}
    assert actors == {"otto"}
    mine = [(e["action"], e["status"], e["role"]) for e in await audit(server, actor="otto")]
    assert mine == [
        ("token.create", 201, "operator"),
        ("firmware.upload", 201, "operator"),
        ("job.create", 201, "operator"),
        ("job.pause", 200, "operator"),
        ("job.resume", 200, "operator"),
        ("job.cancel", 200, "operator"),
        ("user.add", 403, "operator"),
        ("device.create", 403, "operator"),
    ]


async def test_tokens_expire_are_revoked_at_once_and_stay_their_owners(server: Server) -> None:
    token = await as_user(server, "ana", "operator")
    mine = await call(server, token, "POST", "/tokens", 201, json={"name": "short", "expiresInSeconds": 3600})
    listed = await call(server, token, "GET", "/tokens", 200)
    assert {t["name"] for t in listed["items"]} == {"script", "short"} and "token" not in listed["items"][0]
    await call(server, mine["token"], "GET", "/jobs", 200)
    await call(server, token, "DELETE", f"/tokens/{mine['id']}", 204)
    await call(server, mine["token"], "GET", "/jobs", 401)  # revoked: refused from the next request on
    other = await as_user(server, "bob", "viewer")
    await call(server, other, "DELETE", f"/tokens/{listed['items'][0]['id']}", 404)  # not bob's
    assert len((await server.call("GET", "/tokens", 200))["items"]) == 3  # the admin sees all
    await server.call("PATCH", "/users/ana", 200, json={"role": "viewer"})
    await call(server, token, "POST", "/jobs", 403, json={"firmwareId": "x"})  # the new role, at once
    await server.call("DELETE", "/users/ana", 204)
    await call(server, token, "GET", "/jobs", 401)  # its tokens went with it
    await server.call("DELETE", "/users/admin", 409)
    failed = [e for e in await audit(server, action="auth.failed")]
    assert len(failed) == 2 and all(e["actor"] == "-" and e["status"] == 401 for e in failed)


async def test_bad_user_bodies_are_refused(server: Server) -> None:
    for body, words in [
        ({"username": "a b", "role": "viewer"}, "username must be"),
        ({"username": "ok", "role": "root"}, "role must be one of"),
        ({"username": "ok", "role": "viewer", "password": "short"}, "password must be"),
        ({"username": "ok", "role": "viewer", "x": 1}, "unknown field"),
    ]:
        refused = await server.call("POST", "/users", 400, json=body)
        assert words in refused["error"]["message"], body
    made = await server.call("POST", "/users", 201, json={"username": "gen", "role": "viewer"})
    assert len(made["password"]) >= 16  # made up and shown once
    await server.call("POST", "/users", 409, json={"username": "gen", "role": "viewer"})
    names = [u["username"] for u in (await server.call("GET", "/users", 200))["items"]]
    assert names == ["admin", "gen"]
    csv = (await server.call("GET", "/audit", 200, params={"format": "csv"})).decode().splitlines()
    assert csv[0] == "ts,actor,role,action,target,remoteAddr,status,details" and len(csv) == 1 + 6


async def test_the_console_signs_in_with_a_password_and_refuses_a_viewers_forms(server: Server) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"\x01" * 1000)
    await server.call("POST", "/users", 201, json={"username": "vera", "role": "viewer", "password": "0123456789ab"})
    origin = {"Origin": server.url}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:  # cookies for 127.0.0.1
        async with browser.post(
            server.url + "/ui/login", data={"username": "vera", "password": "wrong-password", "next": "/ui/"},
            headers=origin,
        ) as resp:  # fmt: skip
            assert "do not match" in await resp.text()
        async with browser.post(
            server.url + "/ui/login", data={"username": "vera", "password": "0123456789ab", "next": "/ui/"},
            headers=origin, allow_redirects=False,
        ) as resp:  # fmt: skip
            assert resp.status == 303
        async with browser.get(server.url + f"/ui/firmware/{fw['id']}") as resp:
            page = await resp.text()
            assert resp.status == 200
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        async with browser.post(
            server.url + f"/ui/firmware/{fw['id']}/delete", data={"csrf": csrf}, headers=origin
        ) as resp:
            assert resp.status == 403 and "needs the operator role" in await resp.text()
    await server.call("GET", f"/firmware/{fw['id']}", 200)  # still there
    entries = await audit(server, actor="vera")
    assert [(e["action"], e["status"]) for e in entries] == [("firmware.delete", 403)]
    assert any(e["action"] == "auth.failed" and "console as vera" in e["details"] for e in await audit(server))


async def test_the_cli_manages_users_and_tokens_and_a_viewer_is_refused(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = Cli(server, capsys)
    made = await cli("user", "add", "vera", "--role", "viewer", "--json")
    assert made.rc == 0 and len(made.json()["password"]) >= 16
    listed = await cli("user", "list", "--json")
    assert [u["username"] for u in listed.json()["items"]] == ["admin", "vera"]
    assert (await cli("user", "set-role", "vera", "operator", "--json")).json()["role"] == "operator"
    await cli("user", "set-role", "vera", "viewer")
    token = await as_user(server, "wes", "viewer")
    refused = await cli("product", "add", "pk9", "--name", "x", token=token)
    assert refused.rc == 1 and "forbidden" in refused.err and "wes is viewer" in refused.err
    own = await cli("token", "create", "laptop", "--expires", "600", "--json", token=token)
    assert own.rc == 0 and own.json()["token"].startswith("otb_")
    assert {t["name"] for t in (await cli("token", "list", "--json", token=token)).json()["items"]} == {
        "script", "laptop",
    }  # fmt: skip
    assert (await cli("token", "revoke", own.json()["id"], token=token)).rc == 0
    log = await cli("audit", "show", "--actor", "wes")
    actions = [json.loads(line)["action"] for line in log.out.splitlines()]
    assert actions == ["token.create", "product.create", "token.create", "token.revoke"]
    assert (await cli("user", "remove", "vera")).rc == 0


async def test_the_console_shows_a_viewer_no_buttons_it_cannot_use(server: Server) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"\x01" * 1000)
    await server.call("POST", "/users", 201, json={"username": "vera", "role": "viewer", "password": "0123456789ab"})
    await server.call("POST", "/users", 201, json={"username": "otto", "role": "operator", "password": "0123456789ab"})
    pages: dict[str, str] = {}
    for user in ("vera", "otto"):
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            login = {"username": user, "password": "0123456789ab", "next": "/ui/"}
            async with browser.post(server.url + "/ui/login", data=login, headers={"Origin": server.url}) as resp:
                assert resp.status == 200
            async with browser.get(server.url + f"/ui/firmware/{fw['id']}") as resp:
                pages[user] = await resp.text()
            async with browser.get(server.url + "/ui/devices?product=pk1") as resp:
                pages[user + "-devices"] = await resp.text()
    assert '<p class="whoami">vera (viewer)</p>' in pages["vera"]
    for form in (f"/ui/firmware/{fw['id']}/delete", "/ui/jobs/new"):
        assert form not in pages["vera"], form
        assert form in pages["otto"], form  # an operator may
    assert "/ui/products/pk1/devices" not in pages["otto-devices"]  # registering devices is the admin's
