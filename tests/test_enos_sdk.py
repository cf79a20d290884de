"""The stock EnOS Python SDK (enos-mqtt-sdk-python 0.1.1) logs into otabox and reports its version.

`tests/enos_device.py` drives the unmodified SDK in its own virtualenv (see tests/enos_venv.py).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server, wait_for
from tests.enos_venv import DEVICE_SCRIPT

# Per SDK wait inside the script (connect, each reply); the whole run is bounded by RUN_TIMEOUT.
SDK_TIMEOUT = 30.0  # upper bounds only: generous so a loaded CI machine does not flake
RUN_TIMEOUT = 90.0


@dataclass
class Transcript:
    rc: int
    events: list[dict[str, Any]]
    stderr: str

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]


async def start_device(
    python: Path,
    server: Server,
    dk: str,
    secret: str,
    *,
    version: str,
    sign_method: str = "sha256",
    mode: str = "login",
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(python),
        str(DEVICE_SCRIPT),
        "--host",
        "127.0.0.1",
        "--port",
        str(server.mqtt_port),
        "--product-key",
        "pk1",
        "--device-key",
        dk,
        f"--secret={secret}",  # "=": a secret may start with "-"
        "--version",
        version,
        "--mode",
        mode,
        "--sign-method",
        sign_method,
        "--timeout",
        str(SDK_TIMEOUT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )


async def run_device(python: Path, server: Server, dk: str, secret: str, **kw: Any) -> Transcript:
    """Run the SDK device to its end and return its transcript."""
    proc = await start_device(python, server, dk, secret, **kw)
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert proc.returncode is not None
    return Transcript(proc.returncode, events, err.decode(errors="replace"))


async def next_event(proc: asyncio.subprocess.Process, name: str) -> dict[str, Any]:
    """Read the running device's transcript up to the first `name` event."""
    assert proc.stdout is not None
    async with asyncio.timeout(RUN_TIMEOUT):
        while line := await proc.stdout.readline():
            event: dict[str, Any] = json.loads(line)
            if event["event"] == name:
                return event
    raise AssertionError(f"device exited without a {name!r} event")


@pytest.mark.parametrize("sign_method", ["sha256", "sha1", "md5"])
async def test_stock_sdk_logs_in_and_reports_its_version(server: Server, enos_python: Path, sign_method: str) -> None:
    dev = await server.device("sdk-dev")
    t = await run_device(enos_python, server, "sdk-dev", dev["deviceSecret"], version="1.2.3", sign_method=sign_method)
    assert t.rc == 0, (t.events, t.stderr[-2000:])
    names = [e["event"] for e in t.events]
    assert names[:3] == ["connecting", "connected", "inform_reply"], names
    assert names[-1] == "disconnected"
    assert t.named("inform_reply") == [{"event": "inform_reply", "code": 200, "message": None}]
    assert t.named("connecting")[0]["clientId"].startswith(f"sdk-dev|securemode=2,signmethod=hmac{sign_method},")
    assert t.named("connecting")[0]["username"] == "sdk-dev&pk1"
    shown = await server.call("GET", "/products/pk1/devices/sdk-dev", 200)
    assert shown["version"] == "1.2.3" and shown["lastSeen"] is not None

    async def offline() -> bool:
        return not (await server.call("GET", "/products/pk1/devices/sdk-dev", 200))["online"]

    # The SDK closed its connection: the device is shown offline again.
    await wait_for(offline)


async def test_stock_sdk_device_is_online_while_connected(server: Server, enos_python: Path) -> None:
    dev = await server.device("sdk-dev")
    # push mode: after its version report the device stays connected, waiting for a push.
    proc = await start_device(enos_python, server, "sdk-dev", dev["deviceSecret"], version="3.1.4", mode="push")
    try:
        assert (await next_event(proc, "inform_reply"))["code"] == 200
        shown = await server.call("GET", "/products/pk1/devices/sdk-dev", 200)
        assert shown["online"] is True and shown["version"] == "3.1.4"
        listed = await server.call("GET", "/products/pk1/devices?online=true&version=3.1.4", 200)
        assert [d["deviceKey"] for d in listed["items"]] == ["sdk-dev"]
    finally:
        # Power cut: the process dies without an MQTT DISCONNECT.
        proc.kill()
        await proc.communicate()

    async def offline() -> bool:
        return not (await server.call("GET", "/products/pk1/devices/sdk-dev", 200))["online"]

    await wait_for(offline)


async def test_stock_sdk_with_wrong_secret_is_refused(server: Server, enos_python: Path) -> None:
    await server.device("sdk-dev")
    t = await run_device(enos_python, server, "sdk-dev", "not-the-secret-at-all", version="1.0")
    assert t.rc == 1, t.events
    refused = t.named("connect_refused")
    # CONNACK 4 "bad user name or password" or 5 "not authorized".
    assert refused and refused[0]["rc"] in (4, 5), t.events
    assert not t.named("connected") and not t.named("inform_reply")
    shown = await server.call("GET", "/products/pk1/devices/sdk-dev", 200)
    assert shown["version"] is None and shown["online"] is False


async def _task(server: Server, job_id: str) -> dict[str, Any]:
    items = (await server.call("GET", f"/jobs/{job_id}/tasks", 200))["items"]
    assert len(items) == 1
    task: dict[str, Any] = items[0]
    return task


async def test_stock_sdk_whole_push_upgrade(server: Server, enos_python: Path) -> None:
    dev = await server.device("sdk-push")
    content = bytes(range(256)) * 400
    # 1.0.0 of the same line is stored, so the push carries a delta too: the stock SDK must
    # ignore it and take the full image.
    await server.firmware("pk1", "1.0.0", content[:-256] + bytes(256), name="main")
    fw = await server.firmware("pk1", "2.0.0", content, name="main")
    await server.services.deltas.idle()
    proc = await start_device(enos_python, server, "sdk-push", dev["deviceSecret"], version="1.0.0", mode="push")
    try:
        assert (await next_event(proc, "inform_reply"))["code"] == 200
        job = await server.call(
            "POST", "/jobs", 201, json={"firmwareId": fw["id"], "scope": {"versionNumbers": ["1.0.0"]}}
        )
        assert job["total"] == 1
        push = await next_event(proc, "upgrade")  # the SDK never subscribed: delivered by the server
        assert push["params"]["fileSize"] == len(content) and push["params"]["sign"] == fw["sha256"]
        assert push["params"]["delta"]["from"] == "1.0.0"
        downloaded = await next_event(proc, "downloaded")
        assert downloaded["size_ok"] and downloaded["sign_ok"]
        assert (await next_event(proc, "done"))["version"] == "2.0.0"
        async with asyncio.timeout(RUN_TIMEOUT):
            await proc.wait()
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def succeeded() -> Any:
        t = await _task(server, job["id"])
        return t if t["status"] == "succeeded" else None

    task = await wait_for(succeeded)
    assert task["progress"] == 100 and task["toVersion"] == "2.0.0"
    events = (await server.call("GET", f"/events?jobId={job['id']}")).decode().splitlines()
    statuses = [json.loads(e)["status"] for e in events if json.loads(e)["kind"] != "job"]
    assert statuses[:3] == ["pending", "published", "upgrading"] and statuses[-1] == "succeeded"
    assert await server.store.downloaded_bytes("pk1", "sdk-push", fw["id"]) == len(content)


async def test_stock_sdk_request_mode_with_getversion(server: Server, enos_python: Path) -> None:
    dev = await server.device("sdk-req")
    fw = await server.firmware("pk1", "3.0.0", b"\x7f" * 3000, signMethod="md5")
    job = await server.call(
        "POST", "/jobs", 201, json={"firmwareId": fw["id"], "mode": "request", "scope": {"deviceKeys": ["sdk-req"]}}
    )
    t = await run_device(enos_python, server, "sdk-req", dev["deviceSecret"], version="1.0.0", mode="request")
    assert t.rc == 0, t.stderr[-2000:]
    offers = t.named("offers")[0]
    assert offers["code"] == 200 and offers["data"][0]["version"] == "3.0.0"
    assert offers["data"][0]["signMethod"] == "md5" and offers["data"][0]["sign"] == fw["md5"]
    assert t.named("downloaded")[0]["sign_ok"]
    assert [e["code"] for e in t.named("progress_sent")] == [200, 200, 200]

    async def succeeded() -> Any:
        task = await _task(server, job["id"])
        return task if task["status"] == "succeeded" else None

    await wait_for(succeeded)
