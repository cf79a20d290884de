"""A real otabox server plus simulated MQTT devices on one asyncio loop in a background thread.

The browser tests use sync Playwright on the main thread, so nothing asyncio may run there
(sync Playwright refuses to start inside a running loop, and pytest-asyncio is kept out of this
pytest run). Everything async goes through `LiveServer.run(coro)`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import aiohttp

from otabox import protocol
from otabox.server.app import App
from tests.conftest import TOKEN, Device, start_server

T = TypeVar("T")


class LiveServer:
    """otabox on port 0 in its own thread and event loop; `run()` executes coroutines there."""

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="otabox-live", daemon=True)
        self.thread.start()
        self.app: App = self.run(start_server(data_dir, **settings))
        self.url = f"http://127.0.0.1:{self.app.http_port}"
        self.http: aiohttp.ClientSession = self.run(self._session())
        self.devices: list[SimDevice] = []

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def api(self, method: str, path: str, expect: int | None = None, **kw: Any) -> Any:
        async def call() -> Any:
            async with self.http.request(method, self.url + "/api/v1" + path, **kw) as resp:
                data = await resp.json() if resp.content_type == "application/json" else await resp.read()
                if expect is not None:
                    assert resp.status == expect, (resp.status, data)
                return data

        return self.run(call())

    def add_devices(
        self,
        pk: str,
        keys: list[str],
        version: str,
        *,
        fail: dict[str, tuple[int, str]] | None = None,
        pace: float = 0.6,
    ) -> list[SimDevice]:
        """Register, connect and start devices that upgrade on every push (or fail as told)."""
        out = []
        for dk in keys:
            created = self.api("POST", f"/products/{pk}/devices", 201, json={"deviceKey": dk, "tags": {"site": "east"}})
            dev = SimDevice(self, pk, dk, created["deviceSecret"], pace=pace, fail=(fail or {}).get(dk))
            self.run(dev.start(version))
            out.append(dev)
        self.devices.extend(out)
        return out

    def stop(self) -> None:
        async def shutdown() -> None:
            for dev in self.devices:
                await dev.stop()
            await self.http.close()
            await self.app.stop()

        try:
            self.run(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class SimDevice:
    """A device over real MQTT that takes each push: progress 10 -> 60 -> new version (or a failure step)."""

    def __init__(
        self, live: LiveServer, pk: str, dk: str, secret: str, *, pace: float, fail: tuple[int, str] | None
    ) -> None:
        self.device = Device(SimpleNamespace(mqtt_port=live.app.mqtt_port), pk, dk, secret)  # type: ignore[arg-type]
        self.pace = pace
        self.fail = fail
        self.task: asyncio.Task[None] | None = None

    async def start(self, version: str) -> None:
        await self.device.connect(version)
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        d = self.device
        while True:
            params = await d.push(timeout=3600)
            await d.call(protocol.PROGRESS, {"step": "10", "desc": "downloading"})
            await asyncio.sleep(self.pace)
            if self.fail is not None:
                step, desc = self.fail
                await d.call(protocol.PROGRESS, {"step": str(step), "desc": desc})
                continue
            await d.call(protocol.PROGRESS, {"step": "60", "desc": "flashing"})
            await asyncio.sleep(self.pace)
            await d.call(protocol.INFORM, {"version": params["version"]})

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.device.close()


class PageWatch:
    """Console errors and CSP violations seen by one page."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console.error: {message.text} at {message.location} on {self.page.url}")

    def csp_violations(self) -> list[str]:
        result: list[str] = self.page.evaluate("window.__csp || []")
        return result

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.csp_violations() == []
