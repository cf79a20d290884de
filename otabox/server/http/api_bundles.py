"""Trusted publishers and signed bundle imports (`POST /bundles`) of the management API."""

from __future__ import annotations

import secrets

from aiohttp import web

from otabox.errors import BadRequest, TooLarge
from otabox.server import present
from otabox.server.http.api_firmware import form_parts
from otabox.server.http.plumbing import API_PREFIX, json_response, listing, read_json, services


async def add_publisher(request: web.Request) -> web.Response:
    publisher = await services(request).bundles.add_publisher(await read_json(request))
    return json_response(present.publisher(publisher), status=201)


async def list_publishers(request: web.Request) -> web.Response:
    items = await services(request).store.list_publishers()
    return listing([present.publisher(p) for p in items], len(items))


async def remove_publisher(request: web.Request) -> web.Response:
    await services(request).bundles.remove_publisher(request.match_info["name"])
    return web.Response(status=204)


async def import_bundle(request: web.Request) -> web.Response:
    """Multipart `file`: the bundle, streamed to a temporary file, then checked and imported."""
    svc = services(request)
    tmp = svc.artifacts.tmp / f"bundle-upload-{secrets.token_hex(8)}"
    try:
        got = False
        async for name, chunks in form_parts(request):
            if name != "file":
                async for _ in chunks:
                    pass
                continue
            if got:
                raise BadRequest("only one 'file' part is allowed")
            got = True
            size = 0
            with open(tmp, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > svc.settings.max_upload_bytes:
                        raise TooLarge(f"bundle is larger than the limit of {svc.settings.max_upload_bytes} bytes")
                    fh.write(chunk)
        if not got:
            raise BadRequest("file is required (the bundle)")
        stored = await svc.bundles.import_bundle(tmp)
    finally:
        tmp.unlink(missing_ok=True)
    return json_response({"firmware": [present.firmware(f) for f in stored]}, status=201)


def add_routes(web_app: web.Application) -> None:
    r = web_app.router
    p = API_PREFIX
    r.add_post(f"{p}/publishers", add_publisher)
    r.add_get(f"{p}/publishers", list_publishers)
    r.add_delete(f"{p}/publishers/{{name}}", remove_publisher)
    r.add_post(f"{p}/bundles", import_bundle)
