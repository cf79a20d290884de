"""Dashboard, devices (table with form filters, device page) and the event log."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from otabox.errors import NotFound
from otabox.jobspec import parse_tag
from otabox.models import TASK_STATES, FirmwareStatus, TaskState
from otabox.server import present
from otabox.server.http.console.render import PAGE_SIZE, otabox, page_offset, render
from otabox.server.http.console.views_jobs import job_card

RECENT_FAILURES = 10
LOG_ROWS = 100


async def dashboard_context(request: web.Request) -> dict[str, Any]:
    app = otabox(request)
    jobs = [await job_card(app, job) for job in reversed(await app.store.live_jobs())]
    device_counts = await app.store.device_counts()
    products, _ = await app.store.list_products(1000, 0)
    fleet = [
        {"productKey": p.product_key, "name": p.name, **device_counts.get(p.product_key, {"online": 0, "offline": 0})}
        for p in products
    ]
    firmware, _ = await app.store.list_firmware(None, 1000, 0)
    return {
        "jobs": jobs,
        "fleet": fleet,
        "online": sum(f["online"] for f in fleet),
        "offline": sum(f["offline"] for f in fleet),
        "failures": [
            present.event(e)
            for e in await app.store.recent_events(RECENT_FAILURES, statuses=(TaskState.FAILED, TaskState.TIMEOUT))
        ],
        "unverified": [present.firmware(f) for f in reversed(firmware) if f.status != FirmwareStatus.VERIFIED],
    }


async def dashboard(request: web.Request) -> web.Response:
    return render(request, "dashboard.html", await dashboard_context(request))


def _bool_filter(value: str) -> bool | None:
    return {"true": True, "false": False}.get(value)


async def devices(request: web.Request) -> web.Response:
    app = otabox(request)
    q = request.query
    found, _ = await app.store.list_products(1000, 0)
    products = [present.product(p) for p in found]
    product = q.get("product", "") or (products[0]["productKey"] if products else "")
    version = q.get("version", "").strip()
    tag = q.get("tag", "").strip()
    online = q.get("online", "")
    error = ""
    tags: dict[str, str] = {}
    if tag:
        try:
            k, v = parse_tag(tag)
            tags[k] = v
        except ValueError:
            error = "Tag filter: write it as key=value, e.g. site=east."
    items: list[dict[str, Any]] = []
    total = 0
    offset = page_offset(request)
    if product and not error:
        if await app.store.get_product(product) is None:
            raise NotFound(f"product {product!r} not found")
        listed, total = await app.store.list_devices(
            product, version=version or None, tags=tags, online=_bool_filter(online), limit=PAGE_SIZE, offset=offset
        )
        items = [present.device(d) for d in listed]
    ctx = {
        "products": products,
        "product": product,
        "version": version,
        "tag": tag,
        "online": online,
        "devices": items,
        "total": total,
        "offset": offset,
        "page": PAGE_SIZE,
        "error": error,
    }
    return render(request, "devices.html", ctx)


async def device(request: web.Request) -> web.Response:
    app = otabox(request)
    pk, dk = request.match_info["pk"], request.match_info["dk"]
    dev = present.device(await app.registry.device(pk, dk))
    tasks = await app.store.device_tasks(pk, dk)
    names: dict[str, str] = {}
    for t in tasks:
        if t.job_id not in names:
            job = await app.store.get_job(t.job_id)
            names[t.job_id] = job.name if job else t.job_id
    events = [present.event(e) for e in await app.store.recent_events(LOG_ROWS, product_key=pk, device_key=dk)]
    ctx = {
        "device": dev,
        "tasks": [present.task(t) for t in tasks],
        "job_names": names,
        "events": events,
        "certificates": [present.certificate(c) for c in await app.registry.certificates(pk, dk)],
    }
    return render(request, "device.html", ctx)


def log_filters(request: web.Request) -> dict[str, str]:
    q = request.query
    status = q.get("status", "")
    return {
        "job": q.get("job", "").strip(),
        "product": q.get("product", "").strip(),
        "device": q.get("device", "").strip(),
        "status": status if status in TASK_STATES else "",
    }


async def filtered_events(request: web.Request, f: dict[str, str], after: int = 0) -> list[dict[str, Any]]:
    found = await otabox(request).store.recent_events(
        LOG_ROWS,
        after_seq=after,
        job_id=f["job"] or None,
        product_key=f["product"] or None,
        device_key=f["device"] or None,
        statuses=(f["status"],) if f["status"] else (),
    )
    return [present.event(e) for e in found]


async def event_log(request: web.Request) -> web.Response:
    f = log_filters(request)
    events = await filtered_events(request, f)
    last = events[0]["seq"] if events else await otabox(request).store.last_event_seq()
    return render(request, "events.html", {"f": f, "events": events, "last": last})


def add_routes(sub: web.Application) -> None:
    r = sub.router
    r.add_get("/", dashboard)
    r.add_get("/devices", devices)
    r.add_get("/devices/{pk}/{dk}", device)
    r.add_get("/events", event_log)
