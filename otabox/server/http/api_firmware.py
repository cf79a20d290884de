"""Firmware endpoints of the management API (upload, list, show, delete, URLs, the signing key)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from otabox.errors import BadRequest, NotFound, TooLarge
from otabox.server import present
from otabox.server.firmware import Part
from otabox.server.http.plumbing import API_PREFIX, json_response, listing, page, services
from otabox.server.registry import check_key

# Room for the multipart framing and form fields beside the file itself.
MULTIPART_OVERHEAD = 64 * 1024


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        try:
            chunk = await part.read_chunk(256 * 1024)
        except ValueError as exc:  # aiohttp: "Reading after EOF", a body cut off mid-part
            raise BadRequest("the upload ended before its closing boundary (cut off?)") from exc
        if not chunk:
            return
        yield chunk


async def form_parts(request: web.Request) -> AsyncIterator[Part]:
    """A multipart/form-data body as (name, chunks) parts for `FirmwareService.receive`."""
    limit = services(request).settings.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + MULTIPART_OVERHEAD:
        raise TooLarge(f"firmware file is larger than the limit of {limit} bytes")
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("upload must be multipart/form-data with a 'file' part")
    try:
        reader = await request.multipart()
    except (ValueError, KeyError) as exc:  # no boundary parameter, or an unusable one
        raise BadRequest(f"multipart/form-data needs a boundary parameter: {exc}") from exc
    while True:
        try:
            part = await reader.next()
        # ValueError: a missing boundary, a body that is not multipart after all; BadHttpMessage: a
        # part's headers do not parse (aiohttp raises its HTTP-parser error, which is no ValueError).
        except (ValueError, BadHttpMessage) as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from exc
        if part is None:
            return
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart is not supported")
        yield part.name or "", _chunks(part)


async def upload_firmware(request: web.Request) -> web.Response:
    """Multipart upload streamed to disk; md5/sha256 computed while streaming."""
    svc = services(request)
    pk = (await svc.registry.product(request.match_info["pk"])).product_key
    fw = await svc.firmware.receive(pk, form_parts(request))
    return json_response(present.firmware(fw), status=201)


async def signing_key(request: web.Request) -> web.Response:
    """otabox extension: the public key devices use to check firmware signatures."""
    signer = services(request).signer
    if signer is None:
        raise NotFound("this server does not sign firmware (no signing_key configured)")
    return json_response({"algorithm": "Ed25519", "publicKey": signer.public_key_b64, "pem": signer.public_key_pem})


async def list_firmware(request: web.Request) -> web.Response:
    svc = services(request)
    pk = (await svc.registry.product(request.match_info["pk"])).product_key
    p = page(request)
    items, total = await svc.store.list_firmware(pk, p.limit, p.offset)
    return listing([present.firmware(f) for f in items], total)


async def get_firmware(request: web.Request) -> web.Response:
    return json_response(present.firmware(await services(request).firmware.get(request.match_info["id"])))


async def firmware_deltas(request: web.Request) -> web.Response:
    svc = services(request)
    fw = await svc.firmware.get(request.match_info["id"])
    made = [d for d in await svc.store.deltas_of(fw.id) if d.to_id == fw.id]
    return json_response({"items": [present.delta(d) for d in made]})


async def delete_firmware(request: web.Request) -> web.Response:
    svc = services(request)
    await svc.firmware.remove(await svc.firmware.get(request.match_info["id"]))
    return web.Response(status=204)


async def firmware_url(request: web.Request) -> web.Response:
    """otabox extension: mint a device-bound download URL (for scripts and support)."""
    svc = services(request)
    fw = await svc.firmware.get(request.match_info["id"])
    dk = check_key(request.query.get("deviceKey"), "deviceKey")
    await svc.registry.device(fw.product_key, dk)
    return json_response({"fileUrl": svc.urls.file_url(fw, dk)})


def add_routes(web_app: web.Application) -> None:
    r = web_app.router
    p = API_PREFIX
    r.add_post(f"{p}/products/{{pk}}/firmware", upload_firmware)
    r.add_get(f"{p}/products/{{pk}}/firmware", list_firmware)
    r.add_get(f"{p}/firmware/{{id}}", get_firmware)
    r.add_delete(f"{p}/firmware/{{id}}", delete_firmware)
    r.add_get(f"{p}/firmware/{{id}}/url", firmware_url)
    r.add_get(f"{p}/firmware/{{id}}/deltas", firmware_deltas)
    r.add_get(f"{p}/signing-key", signing_key)
