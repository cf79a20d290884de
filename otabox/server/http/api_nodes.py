"""`GET /api/v1/nodes`: the otabox nodes sharing this database, up or down, with their devices."""

from __future__ import annotations

from aiohttp import web

from otabox.server import present
from otabox.server.http.plumbing import API_PREFIX, listing, services


async def list_nodes(request: web.Request) -> web.Response:
    nodes = await services(request).nodes.nodes()
    return listing([present.node(n) for n in nodes], len(nodes))


def add_routes(web_app: web.Application) -> None:
    web_app.router.add_get(f"{API_PREFIX}/nodes", list_nodes)
