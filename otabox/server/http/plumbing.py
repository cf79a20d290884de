"""HTTP plumbing shared by every route: the services key, error and auth middleware, request parsing.

May import `otabox.server.services` and the pure modules; the API and console modules import it.
"""

from __future__ import annotations

import base64
import binascii
import csv
import errno
import io
import json
import logging
import math
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from otabox.errors import BadRequest, Forbidden, InsufficientStorage, OtaboxError, Unauthorized
from otabox.models import Principal, parse_iso
from otabox.server import access
from otabox.server.services import Services

log = logging.getLogger(__name__)

SERVICES: web.AppKey[Services] = web.AppKey("otabox", Services)
API_PREFIX = "/api/v1"
# API paths anyone may read: the firmware signing key is public (devices check signatures with it),
# and so is the OpenAPI document (how to call the API, nothing of what is stored; client generators
# and the console's reference page fetch it before they have a token).
PUBLIC_PATHS = frozenset({API_PREFIX + "/signing-key", API_PREFIX + "/openapi.json"})
MAX_PAGE = 1000
MAX_OFFSET = 2**63 - 1  # the databases' largest integer: past it a query cannot even be asked
STREAM_CHUNK = 64 * 1024  # bytes of a streamed log written at a time


def services(request: web.Request) -> Services:
    return request.config_dict[SERVICES]


# Who the upgrade log names when a request has no principal (none should reach a handler).
ADMIN = "admin"


# The request key of the Principal a request acts as (set by the API's auth middleware and the
# console's session check).
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("otabox.principal", Principal)


def principal(request: web.Request) -> Principal:
    """Who the request acts as (every authenticated request has one)."""
    return request[PRINCIPAL]


def actor(request: web.Request) -> str:
    """The operator behind a request, as the upgrade log names them."""
    who = request.get(PRINCIPAL)
    return who.username if who is not None else ADMIN


def stream_format(request: web.Request) -> str:
    """`?format=` of a log download: jsonl (default) or csv. Raises BadRequest."""
    fmt = request.query.get("format", "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise BadRequest("format must be jsonl or csv")
    return fmt


async def stream_rows(
    request: web.Request, rows: AsyncIterator[dict[str, Any]], columns: Sequence[str], fmt: str, name: str
) -> web.StreamResponse:
    """Stream rows (API-shaped dicts) as JSON Lines or CSV (`columns`, nulls empty), in chunks:
    memory stays flat however long the log."""
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="{name}.{fmt}"',
        }
    )
    await resp.prepare(request)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if fmt == "csv":
        writer.writerow(columns)
    async for row in rows:
        if fmt == "csv":
            writer.writerow(["" if row[c] is None else row[c] for c in columns])
        else:
            buf.write(json.dumps(row, ensure_ascii=False) + "\n")
        if buf.tell() > STREAM_CHUNK:
            await resp.write(buf.getvalue().encode())
            buf.seek(0)
            buf.truncate()
    await resp.write(buf.getvalue().encode())
    await resp.write_eof()
    return resp


def parse_time(value: Any, field: str) -> float:
    """ISO 8601 (naive = UTC) -> epoch seconds. Raises BadRequest naming the field."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be an ISO 8601 time string")
    try:
        return parse_iso(value)
    except ValueError as exc:
        raise BadRequest(f"{field} is not an ISO 8601 time: {value!r}") from exc


def json_response(data: Any, status: int = 200) -> web.Response:
    """`data` is already presented (`present.py`): plain JSON values only."""
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, ensure_ascii=False))


def error_response(exc: OtaboxError) -> web.Response:
    return web.json_response(exc.to_json(), status=exc.status)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def parse_json(raw: bytes) -> Any:
    """Standard JSON only: no NaN, Infinity or numbers that overflow to infinity (which would be
    stored and later emitted as bare `NaN`, which browsers reject). Raises BadRequest."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except RecursionError as exc:
        raise BadRequest("body is nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequest(f"body is not valid JSON: {exc}") from exc


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object. Raises BadRequest."""
    body = parse_json(await request.read())
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


@dataclass(frozen=True, slots=True)
class Page:
    limit: int
    offset: int


def page(request: web.Request) -> Page:
    try:
        limit = int(request.query.get("limit", "100"))
        offset = int(request.query.get("offset", "0"))
    except ValueError as exc:
        raise BadRequest("limit and offset must be integers") from exc
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"limit must be between 1 and {MAX_PAGE}")
    if not 0 <= offset <= MAX_OFFSET:
        raise BadRequest(f"offset must be between 0 and {MAX_OFFSET}")
    return Page(limit, offset)


def listing(items: list[Any], total: int) -> web.Response:
    return json_response({"items": items, "total": total})


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        result: web.StreamResponse = await handler(request)
        return result
    except OtaboxError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        slug = {404: "not-found", 405: "method-not-allowed", 413: "too-large"}.get(exc.status, "http-error")
        err = OtaboxError(exc.reason, code=slug)
        # The refusal's own headers stay: a 405 must say in Allow which methods the path takes.
        kept = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate", "retry-after")}
        return web.json_response(err.to_json(), status=exc.status, headers=kept)
    except ConnectionError as exc:
        # A client that drops a download is routine (devices resume with Range).
        log.info("client went away during %s %s: %r", request.method, request.path, exc)
        raise
    except Exception as exc:
        if disk_full(exc):
            log.error("%s %s refused: the disk is full (%s)", request.method, request.path, exc)
            return error_response(
                InsufficientStorage("the server's disk is full: nothing was stored; free space and try again")
            )
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(OtaboxError("internal server error"))


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) says the disk is full: a file write or the database's."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if type(exc).__name__ == "DiskFullError":  # asyncpg's, for SQLSTATE 53100
            return True
        exc = exc.__cause__ or exc.__context__
    return False


async def authenticate(request: web.Request) -> Principal:
    """The principal of the request's credentials: a bearer token, or (to get a token) HTTP Basic.

    A refused attempt is written to the audit log (`auth.failed`). Raises Unauthorized.
    """
    svc = services(request)
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    credentials = credentials.strip()
    who: Principal | None = None
    name = ""
    if scheme.lower() == "bearer" and credentials:
        who = await svc.accounts.by_token(credentials)
    elif scheme.lower() == "basic" and credentials:
        if (request.method, request.path) != ("POST", API_PREFIX + "/tokens"):
            raise Unauthorized("a user name and password only get a token (POST /tokens); use the token")
        try:
            name, _, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
        except (ValueError, binascii.Error):
            name, password = "", ""
        who = await svc.accounts.by_password(name, password) if name else None
    elif not header:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    if who is None:
        detail = f"{scheme.lower() or 'no scheme'}{' as ' + name if name else ''}"
        await svc.accounts.audit(None, "auth.failed", request.path, request.remote or "?", 401, detail)
        raise Unauthorized("invalid credentials")
    return who


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Who is asking, whether their role allows it, and the audit row of every write."""
    if not request.path.startswith(API_PREFIX + "/") or request.path in PUBLIC_PATHS:
        result: web.StreamResponse = await handler(request)
        return result
    return await guarded(request, handler, await authenticate(request))


async def guarded(request: web.Request, handler: Any, who: Principal) -> web.StreamResponse:
    """Run `handler` as `who` if its role allows the request; audit it when it changes state."""
    rule = access.rule_for(request.method, request.path)
    accounts = services(request).accounts
    address = request.remote or "?"
    write = access.is_write(request.method)
    if not who.role.allows(rule.role):
        if write:
            await accounts.audit(who, rule.action, request.path, address, Forbidden.status, "role")
        raise Forbidden(f"{rule.action} needs the {rule.role} role; {who.username} is {who.role}")
    request[PRINCIPAL] = who
    if not write:
        result: web.StreamResponse = await handler(request)
        return result
    status = 500
    try:
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except (web.HTTPException, OtaboxError) as exc:
        status = exc.status
        raise
    finally:
        await accounts.audit(who, rule.action, request.path, address, status)
