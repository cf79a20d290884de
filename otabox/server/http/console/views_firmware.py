"""Firmware: list, streamed upload (the API's own upload code), digests, delete, verify on a few devices."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from otabox.errors import NotFound, OtaboxError
from otabox.jobspec import MAX_VERIFY_DEVICES
from otabox.models import Scope
from otabox.server import present
from otabox.server.http import api_bundles
from otabox.server.http.api_firmware import form_parts
from otabox.server.http.console.render import flash, fragment, html, is_htmx, otabox, render, see_other

# Devices offered for a verify job: enough to choose from, few enough to read.
VERIFY_CHOICES = 200


async def _products(request: web.Request) -> list[dict[str, Any]]:
    items, _ = await otabox(request).store.list_products(1000, 0)
    return [present.product(p) for p in items]


async def _firmware_rows(request: web.Request, product: str | None) -> list[dict[str, Any]]:
    items, _ = await otabox(request).store.list_firmware(product, 1000, 0)
    return [present.firmware(f) for f in reversed(items)]


async def firmware_list(request: web.Request) -> web.Response:
    products = await _products(request)
    product = request.query.get("product", "")
    if not product and len(products) == 1:
        product = products[0]["productKey"]
    if product and not any(p["productKey"] == product for p in products):
        raise NotFound(f"product {product!r} not found")
    ctx = {
        "products": products,
        "product": product,
        "rows": await _firmware_rows(request, product or None),
        "max_upload": otabox(request).settings.max_upload_bytes,
        "publishers": [p.name for p in await otabox(request).store.list_publishers()],
    }
    return render(request, "firmware.html", ctx)


async def import_bundle(request: web.Request) -> web.Response:
    """A signed bundle from the firmware page: the API's own import, then back with what happened."""
    try:
        response = await api_bundles.import_bundle(request)
    except OtaboxError as exc:
        flash(request, f"Bundle refused: {exc.message}")
        return see_other("/ui/firmware")
    stored = json.loads(response.text or "{}")["firmware"]
    names = ", ".join(f"{f['productKey']} {f['name']} {f['version']}" for f in stored)
    flash(request, f"Imported from {stored[0]['publisher']}: {names}.")
    return see_other(f"/ui/firmware?product={stored[0]['productKey']}")


async def upload(request: web.Request) -> web.Response:
    """Multipart upload of one firmware file to a product, streamed to disk while hashed."""
    app = otabox(request)
    pk = (await app.registry.product(request.match_info["pk"])).product_key
    try:
        fw = present.firmware(await app.firmware.receive(pk, form_parts(request)))
    except OtaboxError as exc:
        if is_htmx(request):
            return html(fragment(request, "_upload_result.html", {"fw": None, "error": exc.message}))
        raise
    if is_htmx(request):
        rows = await _firmware_rows(request, pk)
        ctx = {"fw": fw, "error": "", "rows": rows, "oob": True}
        return html(fragment(request, "_upload_result.html", ctx))
    flash(request, f"Uploaded {fw['name']} {fw['version']}.")
    return see_other(f"/ui/firmware/{fw['id']}")


async def _firmware(request: web.Request) -> dict[str, Any]:
    return present.firmware(await otabox(request).firmware.get(request.match_info["id"]))


async def firmware_detail(request: web.Request, *, error: str = "") -> web.Response:
    """The firmware page; `error` is shown on top when a form on it was refused (re-shown as 200)."""
    app = otabox(request)
    fw = await _firmware(request)
    in_use = await app.store.jobs_using_firmware(fw["id"])
    found, _busy = await app.store.scope_devices(fw["productKey"], Scope(), fw["version"])
    candidates = [present.device(d) for d in found]
    online: dict[str, bool] = {}
    if candidates:
        listed, _ = await app.store.list_devices(fw["productKey"], online=True, limit=1000)
        online = {d.device_key: True for d in listed}
    candidates.sort(key=lambda d: (not online.get(d["deviceKey"], False), d["deviceKey"]))
    jobs, _ = await app.store.list_jobs((), 1000, 0)
    ctx = {
        "fw": fw,
        "in_use": in_use,
        "candidates": candidates[:VERIFY_CHOICES],
        "more_candidates": max(0, len(candidates) - VERIFY_CHOICES),
        "online": online,
        "jobs": [present.job(j, {}, 0) for j in jobs if j.firmware_id == fw["id"]][:20],
        "max_verify": MAX_VERIFY_DEVICES,
        "error": error,
        "deltas": [present.delta(d) for d in await app.store.deltas_of(fw["id"]) if d.to_id == fw["id"]],
    }
    return render(request, "firmware_detail.html", ctx)


async def delete(request: web.Request) -> web.Response:
    app = otabox(request)
    record = await app.firmware.get(request.match_info["id"])
    fw = present.firmware(record)
    try:
        await app.firmware.remove(record)
    except OtaboxError as exc:
        return await firmware_detail(request, error=f"Not deleted: {exc.message}.")
    flash(request, f"Deleted firmware {fw['name']} {fw['version']}.")
    return see_other(f"/ui/firmware?product={fw['productKey']}")


async def verify(request: web.Request) -> web.Response:
    """Start a verify job on the chosen devices (at most 10) and go to its live page."""
    app = otabox(request)
    fw = await _firmware(request)
    keys = [str(k) for k in (await request.post()).getall("deviceKey", [])]
    if not keys:
        return await firmware_detail(request, error="Pick at least one device to verify on.")
    body = {"firmwareId": fw["id"], "type": "verify", "scope": {"deviceKeys": keys}}
    try:
        job, _warnings = await app.jobs.create(body)
    except OtaboxError as exc:
        return await firmware_detail(request, error=exc.message)
    return see_other(f"/ui/jobs/{job.id}")


def add_routes(sub: web.Application) -> None:
    r = sub.router
    r.add_get("/firmware", firmware_list)
    r.add_post("/products/{pk}/firmware", upload)
    r.add_post("/bundles", import_bundle)
    r.add_get("/firmware/{id}", firmware_detail)
    r.add_post("/firmware/{id}/delete", delete)
    r.add_post("/firmware/{id}/verify", verify)
