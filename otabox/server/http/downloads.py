"""Firmware downloads for devices: `GET/HEAD /firmware/{id}/{file}?token=...` with Range, ETag and HEAD."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from otabox.errors import Forbidden, NotFound, Unauthorized
from otabox.server.http.plumbing import services

# Send buffer of download connections (bytes): see _CountedFileResponse.prepare.
DOWNLOAD_SNDBUF = 512 * 1024


async def download(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    firmware_id = request.match_info["id"]
    token = request.query.get("token")
    if not token:
        raise Unauthorized("download token required (fileUrl carries it)")
    claims = svc.keys.check_download_token(token, firmware_id)
    if isinstance(claims, str):
        raise Forbidden(claims)
    fw = await svc.store.get_firmware(firmware_id)
    if fw is None or request.match_info["file"] != fw.file_name:
        raise NotFound("no such firmware file")
    path = svc.artifacts.path_for(fw.sha256)
    if not path.exists():
        raise NotFound("firmware file missing on disk")
    pk, dk = claims

    async def sent(nbytes: int) -> None:
        await svc.store.add_download(pk, dk, firmware_id, nbytes)

    # The URL names immutable content, so caches may keep it; this is also why aiohttp
    # ignoring If-Range is harmless here.
    return _CountedFileResponse(path, sent, headers={"Cache-Control": "private, max-age=31536000, immutable"})


class _CountedFileResponse(web.FileResponse):
    """FileResponse that records the bytes of each completed GET (full or Range) it served."""

    def __init__(self, path: Path, on_sent: Callable[[int], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._on_sent = on_sent

    async def prepare(self, request: web.BaseRequest) -> Any:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            # sendfile runs on the event loop and copies as much as the socket buffer takes per
            # call; loopback buffers grow to megabytes, stalling MQTT for milliseconds at a time.
            # A bounded buffer keeps each call short at little cost in throughput.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, DOWNLOAD_SNDBUF)
        writer = await super().prepare(request)  # sends the body (sendfile) before returning
        if request.method == "GET" and self.status in (200, 206):
            await self._on_sent(self.content_length or 0)
        return writer
