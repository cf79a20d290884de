"""Users, personal tokens and the audit log of the management API."""

from __future__ import annotations

import csv
import io
import json

from aiohttp import web

from otabox.errors import BadRequest
from otabox.models import ApiToken, AuditEntry, User, iso
from otabox.server.http.plumbing import (
    API_PREFIX,
    json_response,
    listing,
    parse_time,
    principal,
    read_json,
    services,
)

AUDIT_COLUMNS = ("ts", "actor", "role", "action", "target", "remoteAddr", "status", "details")


def _user(u: User) -> dict[str, object]:
    return {"username": u.username, "role": u.role.value, "createdAt": iso(u.created_at)}


def _token(t: ApiToken) -> dict[str, object]:
    return {
        "id": t.id,
        "name": t.name,
        "username": t.username,
        "createdAt": iso(t.created_at),
        "expiresAt": iso(t.expires_at),
        "revokedAt": iso(t.revoked_at),
        "lastUsedAt": iso(t.last_used_at),
    }


def _audit(e: AuditEntry) -> dict[str, object]:
    return {
        "ts": iso(e.ts),
        "actor": e.actor,
        "role": e.role,
        "action": e.action,
        "target": e.target,
        "remoteAddr": e.remote_addr,
        "status": e.status,
        "details": e.details,
    }


async def add_user(request: web.Request) -> web.Response:
    user, password = await services(request).accounts.add_user(await read_json(request))
    body = _user(user) | ({"password": password} if password else {})
    return json_response(body, status=201)


async def list_users(request: web.Request) -> web.Response:
    users = await services(request).store.list_users()
    return listing([_user(u) for u in users], len(users))


async def update_user(request: web.Request) -> web.Response:
    user = await services(request).accounts.update_user(request.match_info["name"], await read_json(request))
    return json_response(_user(user))


async def remove_user(request: web.Request) -> web.Response:
    await services(request).accounts.remove_user(request.match_info["name"])
    return web.Response(status=204)


async def create_token(request: web.Request) -> web.Response:
    token, secret = await services(request).accounts.create_token(principal(request), await read_json(request))
    return json_response({**_token(token), "token": secret}, status=201)


async def list_tokens(request: web.Request) -> web.Response:
    tokens = await services(request).accounts.tokens(principal(request))
    return listing([_token(t) for t in tokens], len(tokens))


async def revoke_token(request: web.Request) -> web.Response:
    await services(request).accounts.revoke_token(principal(request), request.match_info["id"])
    return web.Response(status=204)


async def audit(request: web.Request) -> web.StreamResponse:
    """The audit log, oldest first, as JSONL (default) or CSV; `since`, `actor`, `action` filter."""
    q = request.query
    fmt = q.get("format", "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise BadRequest("format must be jsonl or csv")
    since = parse_time(q["since"], "since") if q.get("since") else None
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="otabox-audit.{fmt}"',
        }
    )
    await resp.prepare(request)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if fmt == "csv":
        writer.writerow(AUDIT_COLUMNS)
    async for entry in services(request).store.iter_audit(since, q.get("actor") or None, q.get("action") or None):
        row = _audit(entry)
        if fmt == "csv":
            writer.writerow([row[c] for c in AUDIT_COLUMNS])
        else:
            buf.write(json.dumps(row, ensure_ascii=False) + "\n")
        if buf.tell() > 64 * 1024:
            await resp.write(buf.getvalue().encode())
            buf.seek(0)
            buf.truncate()
    await resp.write(buf.getvalue().encode())
    await resp.write_eof()
    return resp


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
