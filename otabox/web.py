"""HTTP plumbing: app keys, error and auth middleware, request parsing helpers, downloads, health."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from otabox.errors import BadRequest, Forbidden, NotFound, OtaboxError, Unauthorized
from otabox.keys import hash_token

if TYPE_CHECKING:
    from otabox.app import App

log = logging.getLogger(__name__)

# Send buffer of download connections (bytes): see _CountedFileResponse.prepare.
DOWNLOAD_SNDBUF = 512 * 1024
APP: web.AppKey[App] = web.AppKey("otabox")
API_PREFIX = "/api/v1"
MAX_PAGE = 1000


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> ISO 8601 UTC with microseconds and a Z."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: Any, field: str) -> float:
    """ISO 8601 (naive = UTC) -> epoch seconds. Raises BadRequest naming the field."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be an ISO 8601 time string")
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequest(f"{field} is not an ISO 8601 time: {value!r}") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


_TIME_KEYS = re.compile(r"(At|^lastSeen)$")


def present(obj: Any) -> Any:
    """Render store rows for the API: `...At` and `lastSeen` epoch fields become ISO strings."""
    if isinstance(obj, list):
        return [present(o) for o in obj]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if _TIME_KEYS.search(k) and isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = iso(v)
            else:
                out[k] = present(v)
        return out
    return obj


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(present(data), status=status, dumps=lambda d: json.dumps(d, ensure_ascii=False))


def error_response(exc: OtaboxError) -> web.Response:
    return web.json_response(exc.to_json(), status=exc.status)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object. Raises BadRequest."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from exc
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
    if offset < 0:
        raise BadRequest("offset must not be negative")
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
        return web.json_response(err.to_json(), status=exc.status)
    except ConnectionError as exc:
        # A client that drops a download is routine (devices resume with Range).
        log.info("client went away during %s %s: %r", request.method, request.path, exc)
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(OtaboxError("internal server error"))


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path.startswith(API_PREFIX + "/"):
        app = request.app[APP]
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(hash_token(token.strip()), app.admin_token_hash):
            raise Unauthorized("invalid token")
    result: web.StreamResponse = await handler(request)
    return result


async def healthz(request: web.Request) -> web.Response:
    app = request.app[APP]
    if not app.ready:
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response(
        {
            "status": "ok",
            "version": app.version,
            "mqttPort": app.mqtt_port,
            "httpPort": app.http_port,
            "devicesConnected": app.broker.connected_count() if app.broker else 0,
        }
    )


async def download(request: web.Request) -> web.StreamResponse:
    """GET/HEAD /firmware/{id}/{file}?token=...: Range, ETag and HEAD via FileResponse."""
    app = request.app[APP]
    firmware_id = request.match_info["id"]
    token = request.query.get("token")
    if not token:
        raise Unauthorized("download token required (fileUrl carries it)")
    claims = app.keys.check_download_token(token, firmware_id)
    if isinstance(claims, str):
        raise Forbidden(claims)
    fw = await app.store.get_firmware(firmware_id)
    if fw is None or request.match_info["file"] != fw["fileName"]:
        raise NotFound("no such firmware file")
    path = app.artifacts.path_for(fw["sha256"])
    if not path.exists():
        raise NotFound("firmware file missing on disk")
    # The URL names immutable content, so caches may keep it; this is also why aiohttp
    # ignoring If-Range is harmless here.
    pk, dk = claims

    async def sent(nbytes: int) -> None:
        await app.store.add_download(pk, dk, firmware_id, nbytes)

    return _CountedFileResponse(path, sent, headers={"Cache-Control": "private, max-age=31536000, immutable"})


class _CountedFileResponse(web.FileResponse):
    """FileResponse that records the bytes of each completed GET (full or Range) it served."""

    def __init__(self, path: Any, on_sent: Any, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._on_sent = on_sent

    async def prepare(self, request: web.BaseRequest) -> Any:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            # sendfile runs on the event loop and copies as much as the socket buffer takes per
            # call; loopback buffers grow to megabytes, stalling MQTT for milliseconds at a time.
            # A bounded buffer keeps each call short at little cost in throughput.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, DOWNLOAD_SNDBUF)
        writer = await super().prepare(request)  # sends the body (sendfile) before returning
        if request.method == "GET" and self.status in (200, 206):
            await self._on_sent(self.content_length or 0)
        return writer


def build_app(app: App) -> web.Application:
    from otabox import api, console, jobs_api

    web_app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=1024**2)
    web_app[APP] = app
    web_app.router.add_get("/healthz", healthz)
    web_app.router.add_get("/firmware/{id}/{file}", download)
    api.add_routes(web_app)
    jobs_api.add_routes(web_app)
    console.setup(web_app)
    return web_app
