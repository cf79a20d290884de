"""The aiohttp application: middlewares, /healthz, downloads, the API routes and the console."""

from __future__ import annotations

import logging

from aiohttp import web

from otabox.server.http import (
    api_accounts,
    api_backup,
    api_bundles,
    api_firmware,
    api_jobs,
    api_nodes,
    api_registry,
    api_webhooks,
    console,
    downloads,
    openapi,
)
from otabox.server.http.plumbing import SERVICES, auth_middleware, authenticate, error_middleware, services
from otabox.server.http.sender import SenderProcess
from otabox.server.metrics import CONTENT_TYPE
from otabox.server.services import Services

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    svc = services(request)
    if not svc.status.ready.is_set():
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response(
        {
            "status": "ok",
            "version": svc.status.version,
            "mqttPort": svc.status.mqtt_port,
            "httpPort": svc.status.http_port,
            "mqttsPort": svc.status.mqtts_port,
            "httpsPort": svc.status.https_port,
            "devicesConnected": svc.outbox.connected_count(),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; needs a token (any role) unless the operator made it public (--metrics-public)."""
    svc = services(request)
    if not svc.settings.metrics_public:
        await authenticate(request)  # any role
    return web.Response(body=await svc.metrics.scrape(), headers={"Content-Type": CONTENT_TYPE})


def build_app(svc: Services) -> web.Application:
    web_app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=1024**2)
    web_app[SERVICES] = svc
    web_app[downloads.SENDERS] = senders = SenderProcess()

    async def start_senders(_: web.Application) -> None:
        try:
            senders.start()
        except OSError as exc:
            log.warning("no download sender process (%s): downloads are sent from the event loop", exc)

    async def stop_senders(_: web.Application) -> None:
        await senders.close()

    web_app.on_startup.append(start_senders)
    web_app.on_cleanup.append(stop_senders)
    web_app.router.add_get("/healthz", healthz)
    web_app.router.add_get("/metrics", metrics)
    web_app.router.add_get("/firmware/{id}/{file}", downloads.download)
    web_app.router.add_get("/firmware/{id}/delta/{from}", downloads.download_delta)
    api_registry.add_routes(web_app)
    api_firmware.add_routes(web_app)
    api_jobs.add_routes(web_app)
    api_bundles.add_routes(web_app)
    api_backup.add_routes(web_app)
    api_webhooks.add_routes(web_app)
    api_accounts.add_routes(web_app)
    api_nodes.add_routes(web_app)
    openapi.add_routes(web_app)
    console.setup(web_app)
    return web_app
