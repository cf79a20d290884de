"""Webhooks of the management API: subscribe a URL to event types, list, delete, delivery history."""

from __future__ import annotations

from aiohttp import web

from otabox.server import present
from otabox.server.http.plumbing import API_PREFIX, json_response, listing, page, read_json, services


async def create_webhook(request: web.Request) -> web.Response:
    hook = await services(request).webhooks.create(await read_json(request))
    return json_response(present.webhook(hook), status=201)


async def list_webhooks(request: web.Request) -> web.Response:
    items = await services(request).store.list_webhooks()
    return listing([present.webhook(h) for h in items], len(items))


async def delete_webhook(request: web.Request) -> web.Response:
    await services(request).webhooks.delete(request.match_info["id"])
    return web.Response(status=204)


async def list_deliveries(request: web.Request) -> web.Response:
    svc = services(request)
    hook = await svc.webhooks.get(request.match_info["id"])
    p = page(request)
    items, total = await svc.store.list_deliveries(hook.id, p.limit, p.offset)
    return listing([present.delivery(d) for d in items], total)


def add_routes(web_app: web.Application) -> None:
    r = web_app.router
    p = API_PREFIX
    r.add_post(f"{p}/webhooks", create_webhook)
    r.add_get(f"{p}/webhooks", list_webhooks)
    r.add_delete(f"{p}/webhooks/{{id}}", delete_webhook)
    r.add_get(f"{p}/webhooks/{{id}}/deliveries", list_deliveries)
