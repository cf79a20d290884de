"""Firmware downloads for devices: `GET/HEAD /firmware/{id}/{file}?token=...` and the deltas to it,
`/firmware/{id}/delta/{from id}?token=...`, with Range, ETag and HEAD. The bytes of both count as
the device's download of firmware `id` (bytesDownloaded), so the saving of a delta shows."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from otabox.errors import Forbidden, NotFound, Unauthorized
from otabox.models import DeltaStatus
from otabox.server.http.plumbing import services
from otabox.server.http.sender import SenderProcess

# Send buffer of download connections (bytes): see _CountedFileResponse.prepare.
DOWNLOAD_SNDBUF = 512 * 1024
# The server's download sender (started with the HTTP app); None or not alive: the loop sends.
SENDERS: web.AppKey[SenderProcess] = web.AppKey("senders", SenderProcess)


def _device(request: web.Request, firmware_id: str) -> tuple[str, str]:
    """The (product key, device key) the request's download token was made for. Raises 401/403."""
    token = request.query.get("token")
    if not token:
        raise Unauthorized("download token required (fileUrl carries it)")
    claims = services(request).keys.check_download_token(token, firmware_id)
    if isinstance(claims, str):
        raise Forbidden(claims)
    return claims


async def download(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    firmware_id = request.match_info["id"]
    pk, dk = _device(request, firmware_id)
    fw = await svc.store.get_firmware(firmware_id)
    if fw is None or request.match_info["file"] != fw.file_name:
        raise NotFound("no such firmware file")
    return _counted(request, await svc.artifacts.local(fw.sha256), pk, dk, firmware_id)


async def download_delta(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    firmware_id = request.match_info["id"]
    pk, dk = _device(request, firmware_id)
    found = await svc.store.get_delta(request.match_info["from"], firmware_id)
    if found is None or found.status != DeltaStatus.READY:
        raise NotFound("no such delta")
    return _counted(request, await svc.artifacts.local(found.sha256), pk, dk, firmware_id)


def _counted(request: web.Request, path: Path, pk: str, dk: str, firmware_id: str) -> web.StreamResponse:
    if not path.exists():
        raise NotFound("firmware file missing on disk")
    store = services(request).store

    async def sent(nbytes: int) -> None:
        await store.add_download(pk, dk, firmware_id, nbytes)

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
            # When the body goes out from the event loop (no sender process), sendfile copies as
            # much as the socket buffer takes per call; loopback buffers grow to megabytes,
            # stalling MQTT for milliseconds at a time. A bounded buffer keeps each call short.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, DOWNLOAD_SNDBUF)
        writer = await super().prepare(request)  # sends the body (_sendfile below) before returning
        if request.method == "GET" and self.status in (200, 206):
            await self._on_sent(self.content_length or 0)
        return writer

    async def _sendfile(self, request: web.BaseRequest, fobj: IO[Any], offset: int, count: int) -> AbstractStreamWriter:
        # Plain TCP: the body goes out from the sender process (otabox.server.http.sender), so
        # MQTT does not wait behind sendfile. TLS keeps aiohttp's path: its bytes must pass
        # through the loop's SSL object.
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        senders = request.app.get(SENDERS) if isinstance(request, web.Request) else None
        if transport is None or sock is None or senders is None or not senders.alive:
            return await super()._sendfile(request, fobj, offset, count)
        if transport.get_extra_info("sslcontext") is not None:
            return await super()._sendfile(request, fobj, offset, count)
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None
        writer.send_headers()  # aiohttp's StreamWriter holds them back until the first body write
        # The headers must be on the wire before the child writes the body. They are a few
        # hundred bytes into an idle socket, so this almost never waits; asyncio has no public
        # "write buffer empty" event to await instead.
        while transport.get_write_buffer_size() and not transport.is_closing():  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        if transport.is_closing():
            raise ConnectionResetError("Connection lost")
        transport.pause_reading()  # the loop leaves the socket alone while the child owns it
        try:
            await senders.send(sock, fobj.fileno(), offset, count)
        finally:
            if not transport.is_closing():
                transport.resume_reading()
        await web.StreamResponse.write_eof(self)
        return writer
