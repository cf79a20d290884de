"""Products and devices from the console: create, import, edit tags, rotate a secret, delete;
device identity: product secrets (dynamic activation), device certificates, requireCertificate.

Every rule is the registry service's (`otabox.server.registry`), as the API uses it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from otabox.errors import BadRequest, OtaboxError
from otabox.jobspec import parse_tag
from otabox.models import iso
from otabox.server import present
from otabox.server.http.console.render import flash, otabox, render, see_other


def _tags(text: str) -> dict[str, str]:
    """One key=value per line; raises ValueError naming the line."""
    return dict(parse_tag(line) for line in text.splitlines() if line.strip())


def _on(value: Any) -> bool:
    """A form's true/false field (a checkbox sends "true" when ticked, nothing otherwise)."""
    return str(value or "") == "true"


def _product_secret_page(request: web.Request, product_key: str, secret: str, what: str) -> web.Response:
    return render(request, "product_secret.html", {"product": product_key, "secret": secret, "what": what})


async def create_product(request: web.Request) -> web.Response:
    form = await request.post()
    body: dict[str, Any] = {"productKey": str(form.get("productKey", "")).strip()}
    if str(form.get("name", "")).strip():
        body["name"] = str(form.get("name", "")).strip()
    if _on(form.get("dynamicActivation")):
        body["dynamicActivation"] = True
    try:
        product, secret = await otabox(request).registry.create_product(body)
    except OtaboxError as exc:
        flash(request, f"Product not created: {exc.message}")
        return see_other("/ui/devices")
    if secret:
        return _product_secret_page(request, product.product_key, secret, "created")
    flash(request, f"Created product {product.product_key}.")
    return see_other(f"/ui/devices?product={product.product_key}")


async def set_dynamic_activation(request: web.Request) -> web.Response:
    pk = request.match_info["pk"]
    wanted = _on((await request.post()).get("on"))
    _, secret = await otabox(request).registry.update_product(pk, {"dynamicActivation": wanted})
    if secret:
        return _product_secret_page(request, pk, secret, "given dynamic activation")
    flash(request, f"Dynamic activation of {pk} is {'on' if wanted else 'off'}.")
    return see_other(f"/ui/devices?product={pk}")


async def rotate_product_secret(request: web.Request) -> web.Response:
    pk = request.match_info["pk"]
    secret = await otabox(request).registry.rotate_product_secret(pk)
    return _product_secret_page(request, pk, secret, "given a new product secret")


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


async def set_require_certificate(request: web.Request) -> web.Response:
    pk, dk = request.match_info["pk"], request.match_info["dk"]
    required = _on((await request.post()).get("required"))
    await otabox(request).registry.update_device(pk, dk, {"requireCertificate": required})
    flash(request, "A certificate is required from now on." if required else "A certificate is no longer required.")
    return see_other(f"/ui/devices/{pk}/{dk}")


async def issue_certificate(request: web.Request) -> web.Response:
    """The result page is the only place the certificate (and a key made here) is ever shown."""
    pk, dk = request.match_info["pk"], request.match_info["dk"]
    form = await request.post()
    body: dict[str, Any] = {}
    csr = str(form.get("csr", "")).strip()
    if csr:
        body["csr"] = csr
    days = str(form.get("validityDays", "")).strip()
    if days:
        if not days.isdigit():
            raise BadRequest("validityDays must be a whole number of days")
        body["validityDays"] = int(days)
    # A refusal (bad CSR, days out of range) is the error page with the service's message and status.
    issued = await otabox(request).registry.issue_certificate(pk, dk, body)
    device = present.device(await otabox(request).registry.device(pk, dk))
    ctx = {"device": device, "issued": issued, "not_after": iso(issued.not_after)}
    return render(request, "device_certificate.html", ctx)


async def revoke_certificate(request: web.Request) -> web.Response:
    pk, dk, serial = request.match_info["pk"], request.match_info["dk"], request.match_info["serial"]
    await otabox(request).registry.revoke_certificate(pk, dk, serial)
    flash(request, f"Revoked certificate {serial}; a connection made with it was closed.")
    return see_other(f"/ui/devices/{pk}/{dk}")


def add_routes(sub: web.Application) -> None:
    r = sub.router
    r.add_post("/products", create_product)
    r.add_post("/products/{pk}/dynamic-activation", set_dynamic_activation)
    r.add_post("/products/{pk}/rotate-secret", rotate_product_secret)
    r.add_post("/products/{pk}/devices", create_device)
    r.add_post("/products/{pk}/devices:import", import_devices)
    r.add_post("/devices/{pk}/{dk}/tags", set_tags)
    r.add_post("/devices/{pk}/{dk}/rotate-secret", rotate_secret)
    r.add_get("/devices/{pk}/{dk}/delete", delete_confirm)
    r.add_post("/devices/{pk}/{dk}/delete", delete)
    r.add_post("/devices/{pk}/{dk}/require-certificate", set_require_certificate)
    r.add_post("/devices/{pk}/{dk}/certificates", issue_certificate)
    r.add_post("/devices/{pk}/{dk}/certificates/{serial}/revoke", revoke_certificate)
