"""Products and devices from the console: create, import, edit tags, rotate a secret, delete.

Every rule is the registry service's (`otabox.server.registry`), as the API uses it.
"""

from __future__ import annotations

from aiohttp import web

from otabox.errors import OtaboxError
from otabox.jobspec import parse_tag
from otabox.server import present
from otabox.server.http.console.render import flash, otabox, render, see_other


def _tags(text: str) -> dict[str, str]:
    """One key=value per line; raises ValueError naming the line."""
    return dict(parse_tag(line) for line in text.splitlines() if line.strip())


async def create_product(request: web.Request) -> web.Response:
    form = await request.post()
    body = {"productKey": str(form.get("productKey", "")).strip()}
    if str(form.get("name", "")).strip():
        body["name"] = str(form.get("name", "")).strip()
    try:
        product, _ = await otabox(request).registry.create_product(body)
    except OtaboxError as exc:
        flash(request, f"Product not created: {exc.message}")
        return see_other("/ui/devices")
    flash(request, f"Created product {product.product_key}.")
    return see_other(f"/ui/devices?product={product.product_key}")


async def _secret_page(request: web.Request, pk: str, dk: str, secret: str, what: str) -> web.Response:
    device = present.device(await otabox(request).registry.device(pk, dk))
    return render(request, "device_secret.html", {"device": device, "secret": secret, "what": what})


async def create_device(request: web.Request) -> web.Response:
    pk = request.match_info["pk"]
    form = await request.post()
    try:
        body = {"deviceKey": str(form.get("deviceKey", "")).strip(), "tags": _tags(str(form.get("tags", "")))}
        device, secret = await otabox(request).registry.create_device(pk, body)
    except (OtaboxError, ValueError) as exc:
        flash(request, f"Device not created: {getattr(exc, 'message', exc)}")
        return see_other(f"/ui/devices?product={pk}")
    return await _secret_page(request, pk, device.device_key, secret, "registered")


async def import_devices(request: web.Request) -> web.Response:
    pk = request.match_info["pk"]
    form = await request.post()
    upload = form.get("file")
    text = str(form.get("csv", ""))
    if upload is not None and hasattr(upload, "file"):
        try:
            text = upload.file.read().decode("utf-8")
        except UnicodeDecodeError:
            flash(request, "Import refused: the file is not UTF-8 text (save the CSV as UTF-8).")
            return see_other(f"/ui/devices?product={pk}")
    try:
        result = await otabox(request).registry.import_devices(pk, text, "text/csv")
    except OtaboxError as exc:
        flash(request, f"Import refused: {exc.message}")
        return see_other(f"/ui/devices?product={pk}")
    return render(request, "devices_imported.html", {"product": pk, "result": result})


async def set_tags(request: web.Request) -> web.Response:
    pk, dk = request.match_info["pk"], request.match_info["dk"]
    form = await request.post()
    try:
        await otabox(request).registry.update_device(pk, dk, {"tags": _tags(str(form.get("tags", "")))})
        flash(request, "Tags saved.")
    except (OtaboxError, ValueError) as exc:
        flash(request, f"Tags not saved: {getattr(exc, 'message', exc)}")
    return see_other(f"/ui/devices/{pk}/{dk}")


async def rotate_secret(request: web.Request) -> web.Response:
    pk, dk = request.match_info["pk"], request.match_info["dk"]
    secret = await otabox(request).registry.rotate_secret(pk, dk)
    return await _secret_page(request, pk, dk, secret, "given a new secret")


async def delete_confirm(request: web.Request) -> web.Response:
    pk, dk = request.match_info["pk"], request.match_info["dk"]
    device = present.device(await otabox(request).registry.device(pk, dk))
    task = await otabox(request).store.active_task(pk, dk)
    return render(request, "device_delete.html", {"device": device, "task": present.task(task) if task else None})


async def delete(request: web.Request) -> web.Response:
    pk, dk = request.match_info["pk"], request.match_info["dk"]
    await otabox(request).registry.delete_device(pk, dk)
    flash(request, f"Deleted device {dk}; its upgrade history stays in the log.")
    return see_other(f"/ui/devices?product={pk}")


def add_routes(sub: web.Application) -> None:
    r = sub.router
    r.add_post("/products", create_product)
    r.add_post("/products/{pk}/devices", create_device)
    r.add_post("/products/{pk}/devices:import", import_devices)
    r.add_post("/devices/{pk}/{dk}/tags", set_tags)
    r.add_post("/devices/{pk}/{dk}/rotate-secret", rotate_secret)
    r.add_get("/devices/{pk}/{dk}/delete", delete_confirm)
    r.add_post("/devices/{pk}/{dk}/delete", delete)
