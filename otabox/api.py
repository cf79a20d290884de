"""Management REST API: products, devices, firmware (shared/spec/management-api.md)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import secrets
import string
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web

from otabox import protocol
from otabox.errors import BadRequest, Conflict, NotFound, TooLarge
from otabox.store import DuplicateError
from otabox.web import API_PREFIX, APP, json_response, listing, page, read_json

if TYPE_CHECKING:
    from otabox.app import App

DEVICE_AUTH = ("sign", "plain")
SIGN_METHODS = ("md5", "sha256")
MAX_IMPORT_ROWS = 100_000
_SECRET_ALPHABET = string.ascii_letters + string.digits
# Room for MAX_IMPORT_ROWS rows with long keys, secrets and a few tags; the app-wide
# client_max_size (1 MiB) would refuse an import of about 20,000 devices.
MAX_IMPORT_BYTES = 64 * 1024**2


def _key(value: Any, field: str) -> str:
    if not protocol.valid_key(value):
        raise BadRequest(f"{field} must match [A-Za-z0-9_.-]{{1,64}}")
    return str(value)


def _text(value: Any, field: str, *, required: bool = True, max_len: int = 256) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()) or len(value) > max_len:
        raise BadRequest(f"{field} must be a non-empty string of at most {max_len} characters")
    return value


def _tags(value: Any, field: str = "tags") -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str | int | float) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise BadRequest(f"{field} must be an object of string keys to string values")
    return {k: str(v) for k, v in value.items()}


def _bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return value.lower() in ("true", "1", "yes")
    raise BadRequest(f"{field} must be true or false")


def _secret(value: Any) -> str:
    if value is None:
        # Letters and digits only: a secret starting with "-" reads as an option on command lines.
        return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(32))
    if not isinstance(value, str) or not 8 <= len(value) <= 128 or not value.isprintable():
        raise BadRequest("deviceSecret must be 8-128 printable characters")
    return value


async def _product(request: web.Request) -> str:
    pk = request.match_info["pk"]
    if await request.app[APP].store.get_product(pk) is None:
        raise NotFound(f"product {pk!r} not found")
    return pk


# ---------------------------------------------------------------- products


async def create_product(request: web.Request) -> web.Response:
    body = await read_json(request)
    pk = _key(body.get("productKey"), "productKey")
    name = _text(body.get("name", pk), "name")
    try:
        product = await request.app[APP].store.create_product(pk, name)
    except DuplicateError as exc:
        raise Conflict(f"product {pk!r} already exists", code="duplicate") from exc
    return json_response(product, status=201)


async def list_products(request: web.Request) -> web.Response:
    p = page(request)
    items, total = await request.app[APP].store.list_products(p.limit, p.offset)
    return listing(items, total)


async def get_product(request: web.Request) -> web.Response:
    product = await request.app[APP].store.get_product(request.match_info["pk"])
    if product is None:
        raise NotFound(f"product {request.match_info['pk']!r} not found")
    return json_response(product)


# ---------------------------------------------------------------- devices


async def create_device(request: web.Request) -> web.Response:
    app = request.app[APP]
    pk = await _product(request)
    body = await read_json(request)
    dk = _key(body.get("deviceKey"), "deviceKey")
    secret = _secret(body.get("deviceSecret"))
    tags = _tags(body.get("tags"))
    auth = body.get("auth", "sign")
    if auth not in DEVICE_AUTH:
        raise BadRequest("auth must be 'sign' or 'plain'")
    try:
        await app.store.create_devices(pk, [(dk, app.keys.encrypt(secret), auth, tags)])
    except DuplicateError as exc:
        raise Conflict(f"device {dk!r} already exists in {pk!r}", code="duplicate") from exc
    device = await app.store.get_device(pk, dk)
    assert device is not None
    await app.devices_created(pk, [dk])
    return json_response({**device, "deviceSecret": secret}, status=201)


def _import_rows(text: str, content_type: str) -> list[dict[str, Any]]:
    # Spreadsheets save "CSV UTF-8" with a byte order mark; left in, it hides the header.
    text = text.removeprefix("\ufeff")
    if "json" in content_type or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from exc
        if not isinstance(data, list):
            raise BadRequest("JSON import body must be a list of devices")
        return [row if isinstance(row, dict) else {"_invalid": row} for row in data]
    reader = csv.reader(io.StringIO(text))
    rows = [r for r in reader if any(cell.strip() for cell in r)]
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    if not header or header[0] != "deviceKey":
        # No header: columns are deviceKey, deviceSecret.
        header = ["deviceKey", "deviceSecret"]
    else:
        rows = rows[1:]
    out = []
    for r in rows:
        item: dict[str, Any] = {"tags": {}}
        for name, cell in zip(header, r, strict=False):
            cell = cell.strip()
            if name in ("deviceKey", "deviceSecret", "auth"):
                if cell:
                    item[name] = cell
            elif name and cell:
                # Any further column is a tag; a "tag:" prefix is accepted and dropped.
                item["tags"][name.removeprefix("tag:")] = cell
        out.append(item)
    return out


async def import_devices(request: web.Request) -> web.Response:
    """CSV (deviceKey,deviceSecret,<tag columns>...) or a JSON list; per-row results."""
    app = request.app[APP]
    pk = await _product(request)
    text = await request.clone(client_max_size=MAX_IMPORT_BYTES).text()
    rows = _import_rows(text, request.content_type)
    if len(rows) > MAX_IMPORT_ROWS:
        raise BadRequest(f"at most {MAX_IMPORT_ROWS} devices per import")
    rejected: list[dict[str, Any]] = []
    accepted: list[tuple[int, str, str, str, dict[str, str]]] = []
    seen: set[str] = set()
    for i, row in enumerate(rows, start=1):
        try:
            if "_invalid" in row:
                raise BadRequest("row must be an object")
            dk = _key(row.get("deviceKey"), "deviceKey")
            if dk in seen:
                raise BadRequest("deviceKey appears twice in this import")
            secret = _secret(row.get("deviceSecret"))
            auth = row.get("auth", "sign")
            if auth not in DEVICE_AUTH:
                raise BadRequest("auth must be 'sign' or 'plain'")
            accepted.append((i, dk, secret, auth, _tags(row.get("tags"))))
            seen.add(dk)
        except BadRequest as exc:
            rejected.append({"row": i, "deviceKey": row.get("deviceKey"), "reason": exc.message})
    existing = await app.store.existing_device_keys(pk, [a[1] for a in accepted])
    to_create = []
    for i, dk, secret, auth, tags in accepted:
        if dk in existing:
            rejected.append({"row": i, "deviceKey": dk, "reason": "device already exists"})
        else:
            to_create.append((i, dk, secret, auth, tags))
    await app.store.create_devices(pk, [(dk, app.keys.encrypt(s), a, t) for _, dk, s, a, t in to_create])
    await app.devices_created(pk, [dk for _, dk, *_rest in to_create])
    rejected.sort(key=lambda r: r["row"])
    return json_response(
        {
            "created": len(to_create),
            "rejected": len(rejected),
            "errors": rejected,
            "devices": [{"deviceKey": dk, "deviceSecret": s} for _, dk, s, _a, _t in to_create],
        },
        status=200,
    )


async def list_devices(request: web.Request) -> web.Response:
    app = request.app[APP]
    pk = await _product(request)
    p = page(request)
    q = request.query
    tags = {}
    for tag in q.getall("tag", []):
        k, sep, v = tag.partition(":")
        if not sep or not k:
            raise BadRequest("tag must be given as key:value")
        tags[k] = v
    online = _bool(q["online"], "online") if "online" in q and q["online"] != "" else None
    items, total = await app.store.list_devices(
        pk, version=q.get("version") or None, tags=tags, online=online, limit=p.limit, offset=p.offset
    )
    return listing(items, total)


async def get_device(request: web.Request) -> web.Response:
    app = request.app[APP]
    pk = await _product(request)
    dk = request.match_info["dk"]
    device = await app.store.get_device(pk, dk)
    if device is None:
        raise NotFound(f"device {dk!r} not found in {pk!r}")
    device["currentTask"] = await app.current_task(pk, dk)
    return json_response(device)


# ---------------------------------------------------------------- firmware

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _file_name(name: str, version: str, sha256: str) -> str:
    # Content hash in the name: the URL is immutable, so Range resumes can trust it.
    return f"{_SAFE.sub('_', name)[:40]}-{_SAFE.sub('_', version)[:40]}-{sha256[:12]}.bin"


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        chunk = await part.read_chunk(256 * 1024)
        if not chunk:
            return
        yield chunk


async def upload_firmware(request: web.Request) -> web.Response:
    """Multipart upload streamed to disk; md5/sha256 computed while streaming."""
    pk = await _product(request)
    return json_response(await receive_firmware(request, pk), status=201)


async def receive_firmware(request: web.Request, pk: str) -> dict[str, Any]:
    """Stream a multipart firmware upload of an existing product to disk and register it.

    Also used by the web console. Returns the firmware view; raises BadRequest, Conflict, TooLarge.
    """
    app = request.app[APP]
    limit = app.settings.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise TooLarge(f"firmware file is larger than the limit of {limit} bytes")
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("upload must be multipart/form-data with a 'file' part")
    reader = await request.multipart()
    fields: dict[str, str] = {}
    stored = None
    try:
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart is not supported")
            if part.name == "file":
                if stored is not None:
                    raise BadRequest("only one 'file' part is allowed")
                stored = await app.artifacts.receive(_part_chunks(part), limit)
            elif part.name:
                value = await part.read(decode=True)
                if len(value) > 64 * 1024:
                    raise BadRequest(f"field {part.name} is too long")
                fields[part.name] = value.decode("utf-8", errors="replace")
        if stored is None:
            raise BadRequest("file is required")
        name = _text(fields.get("name"), "name", max_len=64)
        version = fields.get("version")
        if not protocol.valid_version(version):
            raise BadRequest("version must be 1-64 printable characters")
        assert version is not None
        sign_method = fields.get("signMethod", "sha256") or "sha256"
        if sign_method not in SIGN_METHODS:
            raise BadRequest("signMethod must be 'md5' or 'sha256'")
        try:
            min_success = int(fields.get("minSuccessForVerified", "1") or "1")
        except ValueError as exc:
            raise BadRequest("minSuccessForVerified must be an integer") from exc
        if not 1 <= min_success <= 10:
            raise BadRequest("minSuccessForVerified must be between 1 and 10")
        clash = await app.store.firmware_conflict(pk, name, version)
        if clash:
            raise Conflict(f"firmware {clash} already exists in product {pk!r}", code="duplicate")
        fw = {
            "id": "fw-" + uuid.uuid4().hex[:16],
            "productKey": pk,
            "name": name,
            "version": version,
            "desc": _text(fields.get("desc"), "desc", required=False, max_len=4096),
            "size": stored.size,
            "md5": stored.md5,
            "sha256": stored.sha256,
            "signMethod": sign_method,
            "fileName": _file_name(name, version, stored.sha256),
            "enableVerification": _bool(fields.get("enableVerification", "false"), "enableVerification"),
            "minSuccessForVerified": min_success,
            "signature": await asyncio.to_thread(app.signer.sign_file, stored.path) if app.signer else None,
        }
        try:
            created = await app.store.create_firmware(fw)
        except DuplicateError as exc:
            raise Conflict("firmware name or version already exists", code="duplicate") from exc
    except BaseException:
        if stored is not None and not await app.store.sha256_in_use(stored.sha256):
            app.artifacts.remove(stored.sha256)
        raise
    return firmware_view(created)


def firmware_view(fw: dict[str, Any]) -> dict[str, Any]:
    view = {**fw, "sign": fw["md5"] if fw["signMethod"] == "md5" else fw["sha256"]}
    if view.get("signature") is None:
        view.pop("signature", None)
    return view


async def signing_key(request: web.Request) -> web.Response:
    """otabox extension: the public key devices use to check firmware signatures."""
    signer = request.app[APP].signer
    if signer is None:
        raise NotFound("this server does not sign firmware (no signing_key configured)")
    return json_response({"algorithm": "Ed25519", "publicKey": signer.public_key_b64, "pem": signer.public_key_pem})


async def list_firmware(request: web.Request) -> web.Response:
    pk = await _product(request)
    p = page(request)
    items, total = await request.app[APP].store.list_firmware(pk, p.limit, p.offset)
    return listing([firmware_view(f) for f in items], total)


async def get_firmware(request: web.Request) -> web.Response:
    fw = await request.app[APP].store.get_firmware(request.match_info["id"])
    if fw is None:
        raise NotFound(f"firmware {request.match_info['id']!r} not found")
    return json_response(firmware_view(fw))


async def delete_firmware(request: web.Request) -> web.Response:
    app = request.app[APP]
    fw = await app.store.get_firmware(request.match_info["id"])
    if fw is None:
        raise NotFound(f"firmware {request.match_info['id']!r} not found")
    await remove_firmware(app, fw)
    return web.Response(status=204)


async def remove_firmware(app: App, fw: dict[str, Any]) -> None:
    """Delete a firmware and, when no other firmware shares it, its file. Raises Conflict while a job uses it."""
    users = await app.active_jobs_using(fw["id"])
    if users:
        raise Conflict(f"firmware is used by active job(s) {', '.join(users)}", code="in-use")
    await app.store.delete_firmware(fw["id"])
    if not await app.store.sha256_in_use(fw["sha256"]):
        app.artifacts.remove(fw["sha256"])


async def firmware_url(request: web.Request) -> web.Response:
    """otabox extension: mint a device-bound download URL (for scripts and support)."""
    app = request.app[APP]
    fw = await app.store.get_firmware(request.match_info["id"])
    if fw is None:
        raise NotFound(f"firmware {request.match_info['id']!r} not found")
    dk = _key(request.query.get("deviceKey"), "deviceKey")
    if await app.store.get_device(fw["productKey"], dk) is None:
        raise NotFound(f"device {dk!r} not found in {fw['productKey']!r}")
    return json_response({"fileUrl": app.file_url(fw, dk)})


def add_routes(web_app: web.Application) -> None:
    r = web_app.router
    p = API_PREFIX
    r.add_post(f"{p}/products", create_product)
    r.add_get(f"{p}/products", list_products)
    r.add_get(f"{p}/products/{{pk}}", get_product)
    r.add_post(f"{p}/products/{{pk}}/devices", create_device)
    r.add_post(f"{p}/products/{{pk}}/devices:import", import_devices)
    r.add_get(f"{p}/products/{{pk}}/devices", list_devices)
    r.add_get(f"{p}/products/{{pk}}/devices/{{dk}}", get_device)
    r.add_post(f"{p}/products/{{pk}}/firmware", upload_firmware)
    r.add_get(f"{p}/products/{{pk}}/firmware", list_firmware)
    r.add_get(f"{p}/firmware/{{id}}", get_firmware)
    r.add_delete(f"{p}/firmware/{{id}}", delete_firmware)
    r.add_get(f"{p}/firmware/{{id}}/url", firmware_url)
    r.add_get(f"{p}/signing-key", signing_key)
