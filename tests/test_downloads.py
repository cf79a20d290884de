"""Firmware downloads sent by the sender process (otabox.server.http.sender): the bytes, Range,
keep-alive after, a client that goes away or stops reading, and a sender that dies."""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.parse
from typing import Any

import aiohttp
import pytest

from otabox.server.http import downloads, sender
from tests.conftest import Server, wait_for

SIZE = 24 * 1024 * 1024  # several sendfile chunks, more than any socket buffer


@pytest.fixture
async def big(server: Server) -> dict[str, Any]:
    await server.device("d1")
    content = os.urandom(SIZE)
    fw = await server.firmware("pk1", "2.0.0", content)
    url = (await server.call("GET", f"/firmware/{fw['id']}/url?deviceKey=d1", 200))["fileUrl"]
    return {"url": url, "sha256": hashlib.sha256(content).hexdigest(), "content": content}


def senders(server: Server) -> sender.SenderProcess:
    runner = server.app._runner  # the aiohttp application the server runs
    assert runner is not None
    return runner.app[downloads.SENDERS]


async def test_full_and_range_downloads_come_from_the_sender_process(server: Server, big: dict[str, Any]) -> None:
    s = senders(server)
    async with aiohttp.ClientSession() as http:
        async with http.get(big["url"]) as resp:
            assert resp.status == 200 and int(resp.headers["Content-Length"]) == SIZE
            assert hashlib.sha256(await resp.read()).hexdigest() == big["sha256"]
        async with http.get(big["url"], headers={"Range": "bytes=1000-2000999"}) as resp:
            assert resp.status == 206
            assert await resp.read() == big["content"][1000:2001000]
        # Keep-alive: the same connection serves the next request after a body sent by a thread.
        async with http.get(big["url"], headers={"Range": "bytes=-10"}) as resp:
            assert resp.status == 206 and await resp.read() == big["content"][-10:]

    # The child's "sent" reply may reach the server after the client has read the last bytes.
    async def all_sent() -> bool:
        return s.sent_bytes == SIZE + 2_000_000 + 10 and s.active == 0

    assert await wait_for(all_sent, timeout=5)
    task = (await server.call("GET", "/products/pk1/devices/d1", 200))["currentTask"]
    assert task is None  # no job: the download counted nowhere else, and nothing broke


async def test_a_client_that_goes_away_frees_its_thread(server: Server, big: dict[str, Any]) -> None:
    s = senders(server)
    u = urllib.parse.urlsplit(big["url"])
    for _ in range(3):
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        writer.write(f"GET {u.path}?{u.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await reader.readexactly(64 * 1024)  # the body has started
        writer.transport.abort()  # gone mid-body (a reset, not a polite close)
    assert await wait_for(lambda: _idle(s))
    async with aiohttp.ClientSession() as http, http.get(big["url"]) as resp:
        assert hashlib.sha256(await resp.read()).hexdigest() == big["sha256"]


async def _idle(s: sender.SenderProcess) -> bool:
    return s.active == 0


@pytest.fixture
def short_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sender, "STALL_SECONDS", 0.5)  # read when the server starts its sender


async def test_a_client_that_stops_reading_is_dropped(short_stall: None, server: Server, big: dict[str, Any]) -> None:
    s = senders(server)
    u = urllib.parse.urlsplit(big["url"])
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(f"GET {u.path}?{u.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.readexactly(1024)
    # Reads nothing more: the server's socket fills, the sender waits, then gives up.
    assert await wait_for(lambda: _idle(s), timeout=20)
    assert s.sent_bytes < SIZE
    writer.close()
    assert (await server.call("GET", "/products/pk1/devices/d1", 200))["deviceKey"] == "d1"  # still serving


async def test_downloads_go_on_when_the_sender_dies(server: Server, big: dict[str, Any]) -> None:
    s = senders(server)
    assert s._proc is not None
    s._proc.kill()
    assert await wait_for(lambda: _dead(s))
    async with aiohttp.ClientSession() as http, http.get(big["url"]) as resp:  # from the event loop now
        assert hashlib.sha256(await resp.read()).hexdigest() == big["sha256"]
    assert s.sent_bytes == 0


async def _dead(s: sender.SenderProcess) -> bool:
    return not s.alive
