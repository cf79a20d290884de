"""A recording stand-in for the job engine: what devices reported, as the server received it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from otabox import protocol
from tests.conftest import Server


class Recorder:
    """Implements devices.JobHooks; records every device report and answers getversion from `offers_for`."""

    def __init__(self) -> None:
        self.connects: list[str] = []
        self.informs: list[tuple[str, str]] = []
        self.progress: list[tuple[str, int, str | None]] = []
        self.replies: list[tuple[str, int, str | None]] = []
        self.offers_for: dict[str, list[dict[str, Any]]] = {}
        self._changed = asyncio.Condition()

    async def _note(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait(self, predicate: Callable[[], Any], timeout: float = 10) -> Any:
        """Wait until predicate() is truthy (re-checked after every report) and return its value."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)
            return predicate()

    def steps(self, dk: str) -> list[int]:
        return [step for d, step, _ in self.progress if d == dk]

    def versions(self, dk: str) -> list[str]:
        return [v for d, v in self.informs if d == dk]

    async def on_connected(self, product_key: str, device_key: str) -> None:
        self.connects.append(device_key)
        await self._note()

    async def on_inform(self, product_key: str, device_key: str, version: str) -> None:
        self.informs.append((device_key, version))
        await self._note()

    async def on_progress(self, product_key: str, device_key: str, step: int, desc: str | None) -> int:
        self.progress.append((device_key, step, desc))
        await self._note()
        return 200

    async def offers(self, product_key: str, device_key: str) -> list[dict[str, Any]]:
        return self.offers_for.get(device_key, [])

    async def on_upgrade_reply(self, product_key: str, device_key: str, code: int, message: str | None) -> None:
        self.replies.append((device_key, code, message))
        await self._note()


async def offer_params(server: Server, fw: dict[str, Any], dk: str, **override: Any) -> dict[str, Any]:
    """The params of an `ota.device.upgrade` push of firmware `fw` to device `dk`, as spec 3.2 shapes them."""
    full = await server.store.get_firmware(fw["id"])
    assert full is not None, fw["id"]
    params = {
        "version": fw["version"],
        "sign": fw["sign"],
        "signMethod": fw["signMethod"],
        "fileUrl": server.services.urls.file_url(full, dk),
        "fileSize": fw["size"],
        "firmwareName": fw["name"],
        "desc": "test push",
        "jobId": "j-test",
    }
    params.update(override)
    return params


def push(server: Server, dk: str, params: dict[str, Any], pk: str = "pk1", msg_id: str = "p1") -> bool:
    """Deliver an upgrade push straight to the device's session (what a push-mode job does)."""
    payload = protocol.request(msg_id, "ota.device.upgrade", params)
    delivered: bool = server.services.outbox.deliver(pk, dk, protocol.UPGRADE, payload, qos=1)
    return delivered
