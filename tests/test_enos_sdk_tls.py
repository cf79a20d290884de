"""The stock EnOS Python SDK over TLS only: CA pinned, device certificates, dynamic activation.

A real server with plain MQTT and plain HTTP off (`--tls-self-signed`, `--mqtt-port -1`,
`--http-port -1`): whatever the SDK device does, it did over TLS, and its downloads are https.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otabox.server.app import App
from otabox.server.settings import Settings
from tests.conftest import TOKEN, Server, stop_within, wait_for
from tests.enos_venv import DEVICE_SCRIPT
from tests.test_enos_sdk import RUN_TIMEOUT, SDK_TIMEOUT

FIRMWARE = bytes(range(256)) * 300


class TLS:
    def __init__(self, server: Server, mqtts: int, ca: Path) -> None:
        self.server, self.mqtts, self.ca = server, mqtts, ca


@pytest.fixture
async def tls(tmp_path: Path) -> AsyncIterator[TLS]:
    settings = Settings(data_dir=str(tmp_path / "data"), host="127.0.0.1", http_port=-1, mqtt_port=-1,
                        mqtts_port=0, https_port=0, tls_self_signed="127.0.0.1,localhost",
                        scheduler_interval=0.1)  # fmt: skip
    app = App(settings, env={"OTABOX_ADMIN_TOKEN": TOKEN})
    await app.start()
    try:
        ports = json.loads((tmp_path / "data" / "ports.json").read_text())
        assert "mqtt" not in ports and "http" not in ports
        ca = tmp_path / "data" / "ca" / "ca.pem"
        ctx = ssl.create_default_context(cafile=str(ca))
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(ssl=ctx)) as http:
            server = Server(app, http, f"https://127.0.0.1:{ports['https']}", tmp_path / "data")
            yield TLS(server, int(ports["mqtts"]), ca)
    finally:
        await stop_within(app)


async def start(python: Path, tls: TLS, pk: str, dk: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(python), str(DEVICE_SCRIPT), "--port", str(tls.mqtts), "--product-key", pk, "--device-key", dk,
        "--ca", str(tls.ca), "--timeout", str(SDK_TIMEOUT), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def events(proc: asyncio.subprocess.Process, until: str | None = None) -> list[dict[str, Any]]:
    """The transcript up to the first `until` event (or to the end)."""
    assert proc.stdout is not None
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(RUN_TIMEOUT):
        while line := await proc.stdout.readline():
            seen.append(json.loads(line))
            if seen[-1]["event"] == until:
                return seen
        await proc.wait()
    assert until is None, (until, seen)
    return seen


async def push_job(server: Server, pk: str, dk: str) -> dict[str, Any]:
    fw = await server.firmware(pk, "2.0.0", FIRMWARE)
    job: dict[str, Any] = await server.call(
        "POST", "/jobs", 201, json={"firmwareId": fw["id"], "scope": {"deviceKeys": [dk]}}
    )
    return job


async def upgraded(proc: asyncio.subprocess.Process, server: Server, pk: str, dk: str) -> None:
    """With the device waiting for a push: a job, the upgrade over https, the task succeeded."""
    job = await push_job(server, pk, dk)
    push = (await events(proc, "upgrade"))[-1]
    assert push["params"]["fileUrl"].startswith("https://127.0.0.1:")
    rest = await events(proc)
    assert proc.returncode == 0, rest
    assert next(e for e in rest if e["event"] == "downloaded")["sign_ok"]

    async def succeeded() -> bool:
        tasks = (await server.call("GET", f"/jobs/{job['id']}/tasks", 200))["items"]
        return bool(tasks[0]["status"] == "succeeded")

    await wait_for(succeeded)
    assert (await server.call("GET", f"/products/{pk}/devices/{dk}", 200))["version"] == "2.0.0"


async def test_stock_sdk_over_tls_with_the_ca_pinned_and_with_its_certificate(
    tls: TLS, enos_python: Path, tmp_path: Path
) -> None:
    s = tls.server
    dev = await s.device("ca-only")
    proc = await start(enos_python, tls, "pk1", "ca-only", f"--secret={dev['deviceSecret']}", "--version", "1.0.0",
                       "--mode", "push")  # fmt: skip
    await events(proc, "inform_reply")
    await upgraded(proc, s, "pk1", "ca-only")

    # Two-way TLS: the device needs its certificate; without it the same login is refused.
    dev = await s.device("with-cert", requireCertificate=True)
    issued = await s.call("POST", "/products/pk1/devices/with-cert/certificates", 201, json={})
    (tmp_path / "d.pem").write_text(issued["certificate"])
    (tmp_path / "d.key").write_text(issued["privateKey"])
    cert = ("--cert", str(tmp_path / "d.pem"), "--key", str(tmp_path / "d.key"))
    secret = f"--secret={dev['deviceSecret']}"
    bare = await events(await start(enos_python, tls, "pk1", "with-cert", secret, "--version", "1.0.0"))
    assert [e["rc"] for e in bare if e["event"] == "connect_refused"] == [5], bare
    proc = await start(enos_python, tls, "pk1", "with-cert", secret, *cert, "--version", "1.0.0", "--mode", "push")
    await events(proc, "inform_reply")
    # The first upgrade's job has ended: its 2.0.0 may go, so that this device upgrades to a fresh one.
    first_fw = (await s.call("GET", "/products/pk1/firmware", 200))["items"][0]["id"]
    await s.call("DELETE", f"/firmware/{first_fw}", 204)
    await upgraded(proc, s, "pk1", "with-cert")

    # Revoked while connected: the live connection ends, the SDK's reconnect is refused.
    proc = await start(enos_python, tls, "pk1", "with-cert", secret, *cert, "--version", "2.0.0", "--mode", "push")
    await events(proc, "inform_reply")
    await s.call("DELETE", f"/products/pk1/devices/with-cert/certificates/{issued['serial']}", 200)
    rest = await events(proc)
    names = [e["event"] for e in rest]
    assert "connection_lost" in names and proc.returncode == 1, rest
    assert [e["rc"] for e in rest if e["event"] == "connect_refused"] == [5]
    assert (await s.call("GET", "/products/pk1/devices/with-cert", 200))["online"] is False
    # And refused from the start.
    again = await events(await start(enos_python, tls, "pk1", "with-cert", secret, *cert, "--version", "2.0.0"))
    assert [e["rc"] for e in again if e["event"] == "connect_refused"] == [5]
    assert "connected" not in [e["event"] for e in again]


async def test_stock_sdk_dynamic_activation_then_push(tls: TLS, enos_python: Path) -> None:
    s = tls.server
    product = await s.call("POST", "/products", 201, json={"productKey": "dyn", "dynamicActivation": True})
    s.products.add("dyn")
    dev = await s.device("d1", pk="dyn")
    assert dev["activatedAt"] is None
    ps = f"--product-secret={product['productSecret']}"
    proc = await start(enos_python, tls, "dyn", "d1", ps, "--version", "1.0.0", "--mode", "push")
    seen = await events(proc, "inform_reply")
    activated = [e for e in seen if e["event"] == "activated"]
    assert activated and activated[0]["deviceSecret"] == dev["deviceSecret"] != product["productSecret"]
    modes = [e["clientId"].split("|")[1].split(",")[0] for e in seen if e["event"] == "connecting"]
    assert modes == ["securemode=3", "securemode=2"] and seen[-1]["code"] == 200
    assert (await s.call("GET", "/products/dyn/devices/d1", 200))["activatedAt"] is not None
    # The product secret activates it no more.
    second = await events(await start(enos_python, tls, "dyn", "d1", ps, "--version", "1.0.0"))
    assert [e["rc"] for e in second if e["event"] == "connect_refused"] == [5], second
    await upgraded(proc, s, "dyn", "d1")
