"""Products and devices endpoints of the management API."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from otabox.errors import BadRequest
from otabox.jobspec import parse_tag
from otabox.models import Product, iso
from otabox.server import present
from otabox.server.http.plumbing import API_PREFIX, json_response, listing, page, read_json, services

# Room for MAX_IMPORT_ROWS rows with long keys, secrets and a few tags; the app-wide
# client_max_size (1 MiB) would refuse an import of about 20,000 devices.
MAX_IMPORT_BYTES = 64 * 1024**2


def _bool(value: str, field: str) -> bool:
    if value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise BadRequest(f"{field} must be true or false")


def _with_secret(product: Product, secret: str | None) -> dict[str, Any]:
    # The product secret is shown once: where it is made or rotated, never on a read.
    return {**present.product(product), **({"productSecret": secret} if secret else {})}


async def create_product(request: web.Request) -> web.Response:
    product, secret = await services(request).registry.create_product(await read_json(request))
    return json_response(_with_secret(product, secret), status=201)


async def patch_product(request: web.Request) -> web.Response:
    product, secret = await services(request).registry.update_product(
        request.match_info["pk"], await read_json(request)
    )
    return json_response(_with_secret(product, secret))


async def rotate_product_secret(request: web.Request) -> web.Response:
    secret = await services(request).registry.rotate_product_secret(request.match_info["pk"])
    return json_response({"productSecret": secret})


async def list_products(request: web.Request) -> web.Response:
    p = page(request)
    items, total = await services(request).store.list_products(p.limit, p.offset)
    return listing([present.product(x) for x in items], total)


async def get_product(request: web.Request) -> web.Response:
    return json_response(present.product(await services(request).registry.product(request.match_info["pk"])))


async def create_device(request: web.Request) -> web.Response:
    device, secret = await services(request).registry.create_device(request.match_info["pk"], await read_json(request))
    return json_response({**present.device(device), "deviceSecret": secret}, status=201)


async def import_devices(request: web.Request) -> web.Response:
    """CSV (deviceKey,deviceSecret,<tag columns>...) or a JSON list; per-row results."""
    svc = services(request)
    await svc.registry.product(request.match_info["pk"])
    raw = await request.clone(client_max_size=MAX_IMPORT_BYTES).read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the import is not UTF-8 text (save the CSV as UTF-8): {exc}") from exc
    result = await svc.registry.import_devices(request.match_info["pk"], text, request.content_type)
    return json_response(result)


async def list_devices(request: web.Request) -> web.Response:
    svc = services(request)
    pk = (await svc.registry.product(request.match_info["pk"])).product_key
    p = page(request)
    q = request.query
    tags = {}
    for tag in q.getall("tag", []):
        try:
            k, v = parse_tag(tag)
        except ValueError as exc:
            raise BadRequest("tag must be given as key:value") from exc
        tags[k] = v
    online = _bool(q["online"], "online") if q.get("online") else None
    items, total = await svc.store.list_devices(
        pk, version=q.get("version") or None, tags=tags, online=online, limit=p.limit, offset=p.offset
    )
    return listing([present.device(d) for d in items], total)


async def get_device(request: web.Request) -> web.Response:
    svc = services(request)
    device = await svc.registry.device(request.match_info["pk"], request.match_info["dk"])
    task = await svc.store.active_task(device.product_key, device.device_key)
    return json_response({**present.device(device), "currentTask": present.task(task) if task else None})


async def patch_device(request: web.Request) -> web.Response:
    svc = services(request)
    device = await svc.registry.update_device(
        request.match_info["pk"], request.match_info["dk"], await read_json(request)
    )
    return json_response(present.device(device))


async def delete_device(request: web.Request) -> web.Response:
    await services(request).registry.delete_device(request.match_info["pk"], request.match_info["dk"])
    return web.Response(status=204)


async def rotate_secret(request: web.Request) -> web.Response:
    secret = await services(request).registry.rotate_secret(request.match_info["pk"], request.match_info["dk"])
    return json_response({"deviceSecret": secret})


async def issue_certificate(request: web.Request) -> web.Response:
    issued = await services(request).registry.issue_certificate(
        request.match_info["pk"], request.match_info["dk"], await read_json(request)
    )
    body: dict[str, Any] = {
        "serial": issued.serial,
        "certificate": issued.certificate,
        "fingerprint": issued.fingerprint,
        "notAfter": iso(issued.not_after),
    }
    if issued.private_key is not None:
        body["privateKey"] = issued.private_key  # made here: shown this once, never kept
    return json_response(body, status=201)


async def list_certificates(request: web.Request) -> web.Response:
    items = await services(request).registry.certificates(request.match_info["pk"], request.match_info["dk"])
    return listing([present.certificate(c) for c in items], len(items))


async def revoke_certificate(request: web.Request) -> web.Response:
    cert = await services(request).registry.revoke_certificate(
        request.match_info["pk"], request.match_info["dk"], request.match_info["serial"]
    )
    return json_response(present.certificate(cert))


async def ca_pem(request: web.Request) -> web.Response:
    """The CA certificate devices and browsers pin (no token: it is public by nature)."""
    return web.Response(body=services(request).registry.ca.pem, content_type="application/x-pem-file")


def add_routes(web_app: web.Application) -> None:
    r = web_app.router
    p = API_PREFIX
    r.add_post(f"{p}/products", create_product)
    r.add_get(f"{p}/products", list_products)
    r.add_get(f"{p}/products/{{pk}}", get_product)
    r.add_patch(f"{p}/products/{{pk}}", patch_product)
    r.add_post(f"{p}/products/{{pk}}:rotate-secret", rotate_product_secret)
    r.add_post(f"{p}/products/{{pk}}/devices", create_device)
    r.add_post(f"{p}/products/{{pk}}/devices:import", import_devices)
    r.add_get(f"{p}/products/{{pk}}/devices", list_devices)
    r.add_get(f"{p}/products/{{pk}}/devices/{{dk}}", get_device)
    r.add_patch(f"{p}/products/{{pk}}/devices/{{dk}}", patch_device)
    r.add_delete(f"{p}/products/{{pk}}/devices/{{dk}}", delete_device)
    r.add_post(f"{p}/products/{{pk}}/devices/{{dk}}:rotate-secret", rotate_secret)
    r.add_post(f"{p}/products/{{pk}}/devices/{{dk}}/certificates", issue_certificate)
    r.add_get(f"{p}/products/{{pk}}/devices/{{dk}}/certificates", list_certificates)
    r.add_delete(f"{p}/products/{{pk}}/devices/{{dk}}/certificates/{{serial}}", revoke_certificate)
    r.add_get("/ca.pem", ca_pem)
