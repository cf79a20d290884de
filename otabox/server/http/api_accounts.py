"""Users, personal tokens and the audit log of the management API."""

from __future__ import annotations

from aiohttp import web

from otabox.server import present
from otabox.server.http.plumbing import (
    API_PREFIX,
    json_response,
    listing,
    parse_time,
    principal,
    read_json,
    services,
    stream_format,
    stream_rows,
)

AUDIT_COLUMNS = ("ts", "actor", "role", "action", "target", "remoteAddr", "status", "details")


async def add_user(request: web.Request) -> web.Response:
    user, password = await services(request).accounts.add_user(await read_json(request))
    body = present.user(user) | ({"password": password} if password else {})
    return json_response(body, status=201)


async def list_users(request: web.Request) -> web.Response:
    users = await services(request).store.list_users()
    return listing([present.user(u) for u in users], len(users))


async def update_user(request: web.Request) -> web.Response:
    user = await services(request).accounts.update_user(request.match_info["name"], await read_json(request))
    return json_response(present.user(user))


async def remove_user(request: web.Request) -> web.Response:
    await services(request).accounts.remove_user(request.match_info["name"])
    return web.Response(status=204)


async def create_token(request: web.Request) -> web.Response:
    token, secret = await services(request).accounts.create_token(principal(request), await read_json(request))
    return json_response({**present.token(token), "token": secret}, status=201)


async def list_tokens(request: web.Request) -> web.Response:
    tokens = await services(request).accounts.tokens(principal(request))
    return listing([present.token(t) for t in tokens], len(tokens))


async def revoke_token(request: web.Request) -> web.Response:
    await services(request).accounts.revoke_token(principal(request), request.match_info["id"])
    return web.Response(status=204)


async def audit(request: web.Request) -> web.StreamResponse:
    """The audit log, oldest first, as JSONL (default) or CSV; `since`, `actor`, `action` filter."""
    q = request.query
    fmt = stream_format(request)
    since = parse_time(q["since"], "since") if q.get("since") else None
    found = services(request).store.iter_audit(since, q.get("actor") or None, q.get("action") or None)
    return await stream_rows(request, (present.audit_entry(e) async for e in found), AUDIT_COLUMNS, fmt, "otabox-audit")


def add_routes(web_app: web.Application) -> None:
    r = web_app.router
    p = API_PREFIX
    r.add_post(f"{p}/users", add_user)
    r.add_get(f"{p}/users", list_users)
    r.add_patch(f"{p}/users/{{name}}", update_user)
    r.add_delete(f"{p}/users/{{name}}", remove_user)
    r.add_post(f"{p}/tokens", create_token)
    r.add_get(f"{p}/tokens", list_tokens)
    r.add_delete(f"{p}/tokens/{{id}}", revoke_token)
    r.add_get(f"{p}/audit", audit)
