"""The device SDK (otabox.device) against a real server: real MQTT login, pushes, HTTP downloads."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from otabox.device import (
    Decision,
    Device,
    FailureCode,
    FlashFailed,
    LoginRefused,
    Offer,
    VerificationFailed,
)
from tests.conftest import Server, wait_for
from tests.jobhooks import Recorder, offer_params, push

FIRMWARE = os.urandom(300_000)


@pytest.fixture
async def recorder(server: Server) -> Recorder:
    await server.product("pk1")
    rec = Recorder()
    server.gateway.jobs = rec
    return rec


async def make_device(server: Server, dk: str = "d1", **kw: Any) -> Device:
    dev = await server.device(dk)
    kw.setdefault("version", "1.0.0")
    kw.setdefault("reconnect_min", 0.05)
    kw.setdefault("reconnect_max", 0.2)
    return Device("127.0.0.1", server.mqtt_port, "pk1", dk, dev["deviceSecret"], **kw)


@pytest.mark.parametrize("method", ["hmacsha256", "hmacsha1", "hmacmd5"])
async def test_connects_with_each_sign_method_and_reports_its_version(
    server: Server, recorder: Recorder, method: str
) -> None:
    async with await make_device(server, version="1.2.3", sign_method=method) as device:
        assert device.connected
        await recorder.wait(lambda: recorder.versions("d1") == ["1.2.3"])
        shown = await server.call("GET", "/products/pk1/devices/d1", 200)
        assert shown["online"] is True and shown["version"] == "1.2.3"


async def test_wrong_secret_is_refused(server: Server) -> None:
    await server.device("d1")
    device = Device("127.0.0.1", server.mqtt_port, "pk1", "d1", "wrong", version="1")
    with pytest.raises(LoginRefused):
        await device.start(timeout=10)
    assert not device.connected


async def test_push_reaches_on_upgrade_and_download_verifies(
    server: Server, recorder: Recorder, tmp_path: Path
) -> None:
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    got: asyncio.Queue[Offer] = asyncio.Queue()
    device = await make_device(server, on_upgrade=got.put)
    async with device:
        params = await offer_params(server, fw, "d1")
        assert push(server, "d1", params)
        offer = await asyncio.wait_for(got.get(), 10)
        assert offer.version == "2.0.0" and offer.file_size == len(FIRMWARE) and offer.job_id == "j-test"
        await recorder.wait(lambda: recorder.replies == [("d1", 200, None)])  # the push was acknowledged

        path = await device.download(offer, tmp_path / "fw.bin")
        assert path.read_bytes() == FIRMWARE
        assert not (tmp_path / "fw.bin.part").exists()
        steps = await recorder.wait(lambda: (s := recorder.steps("d1")) and s[-1] == 80 and s)
        assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 5


async def test_md5_firmware_verifies(server: Server, recorder: Recorder, tmp_path: Path) -> None:
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE, signMethod="md5")
    assert fw["sign"] == hashlib.md5(FIRMWARE).hexdigest()
    async with await make_device(server) as device:
        offer = Offer.from_params(await offer_params(server, fw, "d1"))
        assert offer.sign_method == "md5"
        assert (await device.download(offer, tmp_path / "fw.bin")).read_bytes() == FIRMWARE


async def test_wrong_sign_fails_verification_and_reports_step_minus_3(
    server: Server, recorder: Recorder, tmp_path: Path
) -> None:
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    async with await make_device(server) as device:
        offer = Offer.from_params(await offer_params(server, fw, "d1", sign="0" * 64))
        with pytest.raises(VerificationFailed) as err:
            await device.download(offer, tmp_path / "fw.bin")
        assert err.value.code == FailureCode.VERIFY and err.value.reported
        await recorder.wait(lambda: -3 in recorder.steps("d1"))
        assert not (tmp_path / "fw.bin").exists() and not (tmp_path / "fw.bin.part").exists()


class CuttingProxy:
    """Forwards downloads to the real server, cutting the first response after `cut_after` bytes."""

    def __init__(self, target: str, cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.ranges: list[str | None] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.ranges.append(request.headers.get("Range"))
        headers = {"Range": request.headers["Range"]} if "Range" in request.headers else {}
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.target + request.path_qs, headers=headers) as upstream,
        ):
            keep = ("Content-Length", "Content-Range", "ETag", "Accept-Ranges")
            resp = web.StreamResponse(
                status=upstream.status, headers={k: upstream.headers[k] for k in keep if k in upstream.headers}
            )
            await resp.prepare(request)
            sent = 0
            async for chunk in upstream.content.iter_chunked(16 * 1024):
                if len(self.ranges) == 1 and sent + len(chunk) > self.cut_after:
                    await resp.write(chunk[: self.cut_after - sent])
                    assert request.transport is not None
                    request.transport.abort()  # the link dies mid-download
                    return resp
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
            return resp


@pytest.fixture
async def proxy(server: Server) -> AsyncIterator[CuttingProxy]:
    cutter = CuttingProxy(server.url, cut_after=100_000)
    app = web.Application()
    app.router.add_get("/{tail:.*}", cutter.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    cutter.url = f"http://127.0.0.1:{port}"
    yield cutter
    await runner.cleanup()


async def test_download_resumes_with_range_after_a_broken_connection(
    server: Server, recorder: Recorder, proxy: CuttingProxy, tmp_path: Path
) -> None:
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    params = await offer_params(server, fw, "d1")
    params["fileUrl"] = params["fileUrl"].replace(server.url, proxy.url)
    async with await make_device(server) as device:
        path = await device.download(Offer.from_params(params), tmp_path / "fw.bin")
    assert path.read_bytes() == FIRMWARE
    assert proxy.ranges[0] is None and len(proxy.ranges) == 2
    resumed_from = int(proxy.ranges[1].removeprefix("bytes=").rstrip("-"))  # type: ignore[union-attr]
    assert 0 < resumed_from <= 100_000


async def test_a_part_file_left_by_an_earlier_run_is_resumed(
    server: Server, recorder: Recorder, proxy: CuttingProxy, tmp_path: Path
) -> None:
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    params = await offer_params(server, fw, "d1")
    params["fileUrl"] = params["fileUrl"].replace(server.url, proxy.url)
    proxy.ranges.append("(pretend the first request happened)")  # so nothing is cut
    (tmp_path / "fw.bin.part").write_bytes(FIRMWARE[:1234])
    async with await make_device(server) as device:
        path = await device.download(Offer.from_params(params), tmp_path / "fw.bin")
    assert path.read_bytes() == FIRMWARE
    assert proxy.ranges[1:] == ["bytes=1234-"]


async def test_confirm_false_declines_with_step_minus_5(server: Server, recorder: Recorder) -> None:
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    upgraded: list[Offer] = []
    device = await make_device(server, confirm=lambda offer: False, on_upgrade=upgraded.append)
    async with device:
        assert push(server, "d1", await offer_params(server, fw, "d1"))
        await recorder.wait(lambda: recorder.steps("d1") == [-5])
    assert upgraded == []


async def test_confirm_none_defers_without_reporting(server: Server, recorder: Recorder) -> None:
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    seen = asyncio.Event()

    def later(offer: Offer) -> bool | None:
        seen.set()
        return None

    async with await make_device(server, confirm=later) as device:
        assert push(server, "d1", await offer_params(server, fw, "d1"))
        await asyncio.wait_for(seen.wait(), 10)
        await wait_for(lambda: _true(len(device.deferred) == 1))
        device.confirm = None  # e.g. the battery is charged now
        assert await device.process(device.deferred[0]) == Decision.ACCEPTED
        assert device.deferred == []
    assert recorder.steps("d1") == []


async def _true(value: bool) -> bool:
    return value


async def test_failure_raised_from_on_upgrade_is_reported(server: Server, recorder: Recorder) -> None:
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)

    def flash(offer: Offer) -> None:
        raise FlashFailed("flash sector 3 failed")

    async with await make_device(server, on_upgrade=flash):
        assert push(server, "d1", await offer_params(server, fw, "d1"))
        await recorder.wait(lambda: recorder.progress == [("d1", -4, "flash sector 3 failed")])


async def test_get_offers_returns_the_servers_list(server: Server, recorder: Recorder) -> None:
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    async with await make_device(server) as device:
        assert await device.get_offers() == []
        recorder.offers_for["d1"] = [await offer_params(server, fw, "d1"), {"version": "broken"}]
        offers = await device.get_offers()
        assert [o.version for o in offers] == ["2.0.0"]  # the malformed offer is skipped


async def test_reconnects_after_the_server_drops_it_and_reports_the_version_again(
    server: Server, recorder: Recorder
) -> None:
    async with await make_device(server, version="1.0.0") as device:
        await recorder.wait(lambda: recorder.versions("d1") == ["1.0.0"])
        await device.report_version("1.1.0")
        assert server.app.broker is not None
        _session, handler = server.app.broker.sessions["pk1/d1"]
        await handler.handle_connection_closed()
        await recorder.wait(lambda: recorder.versions("d1") == ["1.0.0", "1.1.0", "1.1.0"])
        assert device.connections == 2 and device.connected
        assert await device.report_progress(50, "still works") == 200


async def test_a_real_push_job_upgrades_an_sdk_device(server: Server, tmp_path: Path) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE, signMethod="md5")
    device: Device

    async def on_upgrade(offer: Offer) -> None:
        await device.download(offer, tmp_path / "fw.bin")
        await device.report_progress(100, "rebooting")
        await device.report_version(offer.version)

    device = await make_device(server, on_upgrade=on_upgrade)
    async with device:
        await wait_for(lambda: _version_is(server, "1.0.0"))
        body = {"firmwareId": fw["id"], "type": "upgrade", "name": "sdk", "scope": {"deviceKeys": ["d1"]}}
        job = await server.call("POST", "/jobs", 201, json=body)
        await wait_for(lambda: _job_done(server, job["id"]))
    tasks = await server.call("GET", f"/jobs/{job['id']}/tasks", 200)
    assert [(t["status"], t["toVersion"]) for t in tasks["items"]] == [("succeeded", "2.0.0")]
    assert (tmp_path / "fw.bin").read_bytes() == FIRMWARE


async def _version_is(server: Server, version: str) -> bool:
    return bool((await server.call("GET", "/products/pk1/devices/d1", 200))["version"] == version)


async def _job_done(server: Server, job_id: str) -> bool:
    return bool((await server.call("GET", f"/jobs/{job_id}", 200))["status"] == "completed")
