"""The console's users, tokens and audit pages over real HTTP against a real server: who may open
them, the forms (through CSRF, refused with the service's message), and the audit row of each."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import Server
from tests.test_console import Console

PASSWORD = "0123456789ab"


class Browser(Console):
    async def sign_in_as(self, username: str, password: str = PASSWORD) -> None:
        login = {"username": username, "password": password, "next": "/ui/"}
        async with self.http.post(self.server.url + "/ui/login", data=login, allow_redirects=False) as resp:
            assert resp.status == 303, await resp.text()
        self.csrf = csrf_of(await self.get("/ui/"))

    async def form(self, path: str, data: dict[str, str] | None = None, expect: int = 303) -> Any:
        return await self.post(path, {"csrf": self.csrf, **(data or {})}, expect=expect, headers={"X-CSRF-Token": ""})


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page[:500]
    return found.group(1)


class Browsers:
    """Browsers to sign in, each with its own cookie jar; `[0]` is signed in with the admin token."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.made: list[Browser] = []

    def __getitem__(self, i: int) -> Browser:
        return self.made[i]

    async def new(self) -> Browser:
        b = Browser(self.server, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))
        self.made.append(b)
        return b

    async def close(self) -> None:
        for b in self.made:
            await b.http.close()


@pytest.fixture
async def browsers(server: Server) -> AsyncIterator[Browsers]:
    made = Browsers(server)
    assert (await (await made.new()).sign_in()).status == 303
    yield made
    await made.close()


async def add(server: Server, username: str, role: str) -> None:
    await server.call("POST", "/users", 201, json={"username": username, "role": role, "password": PASSWORD})


async def audit(server: Server, **query: str) -> list[dict[str, Any]]:
    text = await server.call("GET", "/audit", 200, params=query)
    return [json.loads(line) for line in text.decode().splitlines()]


async def test_viewers_and_operators_get_no_users_or_audit_page(server: Server, browsers: Browsers) -> None:
    await add(server, "vera", "viewer")
    await add(server, "otto", "operator")
    admin_nav = await browsers[0].get("/ui/")
    assert 'href="/ui/users"' in admin_nav and 'href="/ui/audit"' in admin_nav
    for name in ("vera", "otto"):
        b = await browsers.new()
        await b.sign_in_as(name)
        nav = await b.get("/ui/")
        assert 'href="/ui/users"' not in nav and 'href="/ui/audit"' not in nav and 'href="/ui/tokens"' in nav
        for path in ("/ui/users", "/ui/users/admin/delete", "/ui/audit", "/ui/audit/export?format=csv"):
            page = await b.get(path, expect=403)
            assert f"{name} is {'viewer' if name == 'vera' else 'operator'}" in page, path
        async with b.http.head(server.url + "/ui/audit") as resp:
            assert resp.status == 403
        for path, data in (
            ("/ui/users", {"username": "mallory", "role": "admin"}),
            ("/ui/users/otto/role", {"role": "admin"}),
            ("/ui/users/vera/delete", {}),
        ):
            assert "needs the admin role" in await b.form(path, data, expect=403)
        # Their own tokens, and signing out, are everybody's.
        assert "Your tokens" in await b.get("/ui/tokens")
        assert await b.form("/ui/logout") == "/ui/login"
    assert [u["role"] for u in (await server.call("GET", "/users", 200))["items"]] == ["admin", "operator", "viewer"]
    refused = [(e["actor"], e["action"], e["status"]) for e in await audit(server) if e["status"] == 403]
    assert refused == [
        (n, a, 403) for n in ("vera", "otto") for a in ("user.add", "user.update", "user.remove")
    ]  # fmt: skip


async def test_an_admin_adds_changes_and_removes_users_through_the_forms(server: Server, browsers: Browsers) -> None:
    ui = browsers[0]
    assert await ui.form("/ui/users", {"username": "ana", "role": "operator", "password": PASSWORD}) == "/ui/users"
    page = await ui.form("/ui/users", {"username": "bob", "role": "viewer", "password": ""}, expect=200)
    made = re.search(r'<code id="new-password">([^<]+)</code>', page)
    assert made and len(made.group(1)) >= 16  # made up and shown once
    bob = await browsers.new()
    await bob.sign_in_as("bob", made.group(1))
    # The service's own refusals, as form errors with the API's status.
    page = await ui.form("/ui/users", {"username": "bob", "role": "viewer"}, expect=409)
    assert "User not added: user &#39;bob&#39; exists." in page and 'value="bob"' in page
    page = await ui.form("/ui/users", {"username": "a b", "role": "viewer"}, expect=400)
    assert "username must be 1-64 characters" in page
    page = await ui.form("/ui/users", {"username": "cy", "role": "viewer", "password": "short"}, expect=400)
    assert "password must be 10 to 1000 characters" in page
    assert await ui.form("/ui/users/ana/role", {"role": "admin"}) == "/ui/users"
    assert "the built-in admin stays an admin" in await ui.form("/ui/users/admin/role", {"role": "viewer"}, expect=409)
    assert "role must be one of" in await ui.form("/ui/users/ana/role", {"role": "root"}, expect=400)
    page = await ui.get("/ui/users")
    assert "ana" in page and "bob" in page and "/ui/users/admin/delete" not in page
    assert "Remove user bob?" in await ui.get("/ui/users/bob/delete")
    assert await ui.form("/ui/users/bob/delete") == "/ui/users"
    assert "not found" in await ui.form("/ui/users/bob/delete", expect=404)
    assert "cannot be removed" in await ui.form("/ui/users/admin/delete", expect=409)
    users = {u["username"]: u["role"] for u in (await server.call("GET", "/users", 200))["items"]}
    assert users == {"admin": "admin", "ana": "admin"}
    # bob's open session ended with him.
    await bob.get("/ui/", allow_redirects=False, expect=303)
    mine = [(e["action"], e["target"], e["status"]) for e in await audit(server, actor="admin")]
    assert mine == [
        ("user.add", "/ui/users", 303),
        ("user.add", "/ui/users", 200),
        ("user.add", "/ui/users", 409),
        ("user.add", "/ui/users", 400),
        ("user.add", "/ui/users", 400),
        ("user.update", "/ui/users/ana/role", 303),
        ("user.update", "/ui/users/admin/role", 409),
        ("user.update", "/ui/users/ana/role", 400),
        ("user.remove", "/ui/users/bob/delete", 303),
        ("user.remove", "/ui/users/bob/delete", 404),
        ("user.remove", "/ui/users/admin/delete", 409),
    ]
    assert all(e["role"] == "admin" for e in await audit(server, actor="admin"))


async def test_tokens_are_created_shown_once_listed_and_revoked(server: Server, browsers: Browsers) -> None:
    await add(server, "vera", "viewer")
    vera = await browsers.new()
    await vera.sign_in_as("vera")
    page = await vera.form("/ui/tokens", {"name": "laptop", "expires": "86400"}, expect=200)
    secret = re.search(r'<code id="new-token"[^>]*>([^<]+)</code>', page)
    assert secret and secret.group(1).startswith("otb_")
    token = secret.group(1)
    listed = await server.call("GET", "/tokens", 200)
    mine = next(t for t in listed["items"] if t["name"] == "laptop")
    assert mine["username"] == "vera" and mine["expiresAt"] is not None
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as api:
        async with api.get(server.url + "/api/v1/jobs") as resp:
            assert resp.status == 200
        page = await vera.get("/ui/tokens")
        assert "laptop" in page and token not in page and f"/ui/tokens/{mine['id']}/revoke" in page
        assert "name must be a string" in await vera.form("/ui/tokens", {"name": "", "expires": ""}, expect=400)
        assert "choose an expiry" in await vera.form("/ui/tokens", {"name": "x", "expires": "-5"}, expect=400)
        # The admin sees everyone's; vera only her own, and cannot revoke another's.
        await browsers[0].form("/ui/tokens", {"name": "admin-ci", "expires": ""}, expect=200)
        admin_page = await browsers[0].get("/ui/tokens")
        assert "laptop" in admin_page and "admin-ci" in admin_page and "Personal tokens" in admin_page
        assert "admin-ci" not in await vera.get("/ui/tokens")
        other = next(t for t in (await server.call("GET", "/tokens", 200))["items"] if t["name"] == "admin-ci")
        assert "not found" in await vera.form(f"/ui/tokens/{other['id']}/revoke", expect=404)
        assert await vera.form(f"/ui/tokens/{mine['id']}/revoke") == "/ui/tokens"
        async with api.get(server.url + "/api/v1/jobs") as resp:
            assert resp.status == 401  # revoked at once
    assert "revoked" in await vera.get("/ui/tokens")
    assert await browsers[0].form(f"/ui/tokens/{other['id']}/revoke") == "/ui/tokens"
    rows = [(e["actor"], e["action"], e["status"]) for e in await audit(server) if e["action"].startswith("token.")]
    assert rows == [
        ("vera", "token.create", 200),
        ("vera", "token.create", 400),
        ("vera", "token.create", 400),
        ("admin", "token.create", 200),
        ("vera", "token.revoke", 404),
        ("vera", "token.revoke", 303),
        ("admin", "token.revoke", 303),
    ]


async def test_a_session_follows_role_changes_removal_and_its_token(server: Server, browsers: Browsers) -> None:
    await add(server, "otto", "operator")
    otto = await browsers.new()
    await otto.sign_in_as("otto")
    assert "otto (operator)" in await otto.get("/ui/")
    await server.call("PATCH", "/users/otto", 200, json={"role": "viewer"})
    assert "otto (viewer)" in await otto.get("/ui/")  # the next request has the new role
    assert "needs the operator role" in await otto.form("/ui/firmware/fw-x/delete", expect=403)
    # Signed in with a personal token: revoking the token ends the session.
    made = await server.call("POST", "/tokens", 201, json={"name": "console"})
    by_token = await browsers.new()
    assert (await by_token.sign_in(made["token"])).status == 303
    assert "admin (admin)" in await by_token.get("/ui/")
    await server.call("DELETE", f"/tokens/{made['id']}", 204)
    await by_token.get("/ui/", allow_redirects=False, expect=303)
    await server.call("DELETE", "/users/otto", 204)
    await otto.get("/ui/", allow_redirects=False, expect=303)


async def test_the_audit_page_filters_pages_and_downloads(server: Server, browsers: Browsers) -> None:
    ui = browsers[0]
    await add(server, "vera", "viewer")
    vera = await browsers.new()
    await vera.sign_in_as("vera")
    await vera.form("/ui/users", {"username": "x", "role": "admin"}, expect=403)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer wrong"}) as bad:
        for _ in range(55):
            async with bad.get(server.url + "/api/v1/jobs") as resp:
                assert resp.status == 401
    page = await ui.get("/ui/audit")
    assert "57 entries match" in page  # user.add (API), vera's refused form, 55 refused tokens
    assert "1\u201350 of 57" in page and "offset=50" in page
    rows = re.findall(r"<tr(?: class=\"failure\")?>\s*<td><time", page)
    assert len(rows) == 50
    assert "user.add" not in page.split("<tbody>")[1]  # newest first: the oldest two are on the next page
    assert "audit.read" not in page  # reads are not audited, so the action filter does not offer them
    later = await ui.get("/ui/audit?offset=50")
    assert "51\u201357 of 57" in later and later.index("/ui/users") < later.index("/api/v1/users")
    page = await ui.get("/ui/audit?actor=vera")
    assert "1 entry match" in page and "/ui/users" in page and "auth.failed" not in page.split("<tbody>")[1]
    page = await ui.get("/ui/audit?action=user.add")
    assert "2 entries match" in page
    assert "0 entries match" in await ui.get("/ui/audit?since=2999-01-01")
    assert "57 entries match" in await ui.get("/ui/audit?since=2000-01-01T00:00")
    assert "write a UTC time" in await ui.get("/ui/audit?since=yesterday")
    assert 'href="/ui/audit/export?actor=vera&amp;format=csv"' in await ui.get("/ui/audit?actor=vera")
    async with ui.http.get(server.url + "/ui/audit/export?actor=vera&format=csv") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
        lines = (await resp.text()).splitlines()
    assert lines[0] == "ts,actor,role,action,target,remoteAddr,status,details"
    assert len(lines) == 2 and ",vera,viewer,user.add,/ui/users," in lines[1]
    async with ui.http.get(server.url + "/ui/audit/export?action=auth.failed") as resp:
        assert len((await resp.text()).splitlines()) == 55
    # Reading the log is not itself a write: the page and downloads added nothing.
    assert len(await audit(server)) == 57
