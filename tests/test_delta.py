"""Delta updates end to end: the server makes a delta once per firmware pair, pushes carry it
beside the full image, the device SDK rebuilds the exact image from it or falls back to the full one."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otabox import delta
from otabox.device import Device, Offer
from otabox.models import DeltaStatus
from tests.conftest import TOKEN, Server, start_server, stop_within, wait_for
from tests.conftest import Device as ScriptedDevice
from tests.test_console import Console, ui  # noqa: F401  (the signed-in console fixture)


def _release(old: bytes) -> bytes:
    """The next release of `old`: small changes scattered through it."""
    new = bytearray(old)
    for i in range(0, len(new), 40_000):
        new[i : i + 64] = random.Random(i).randbytes(64)
    return bytes(new)


OLD = random.Random(7).randbytes(400_000)
NEW = _release(OLD)


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1}


@contextlib.asynccontextmanager
async def server_with(tmp_path: Path, **settings: Any) -> AsyncIterator[Server]:
    """A server of its own with `settings` (the module's `server` fixture has the defaults)."""
    app = await start_server(tmp_path, scheduler_interval=0.1, **settings)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            yield Server(app, http, f"http://127.0.0.1:{app.http_port}", tmp_path / "data")
    finally:
        await stop_within(app)


async def line(server: Server) -> tuple[dict[str, Any], dict[str, Any]]:
    """Firmware 1.0 and 2.0 of one line; the 1.0 -> 2.0 delta made (on upload of 2.0)."""
    await server.product("pk1")
    old = await server.firmware("pk1", "1.0", OLD, name="main")
    new = await server.firmware("pk1", "2.0", NEW, name="main")
    await server.services.deltas.idle()
    return old, new


async def push_to(server: Server, fw: dict[str, Any], dk: str, version: str, **body: Any) -> dict[str, Any]:
    d = await server.device(dk)
    dev = ScriptedDevice(server, "pk1", dk, d["deviceSecret"])
    await dev.connect(version)
    await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"], "scope": {"deviceKeys": [dk]}, **body})
    params = await dev.push()
    await dev.close()
    return params


async def test_a_push_carries_a_delta_that_rebuilds_the_exact_image(server: Server, tmp_path: Path) -> None:
    old, new = await line(server)
    made = await server.store.get_delta(old["id"], new["id"])
    assert made is not None and made.status == DeltaStatus.READY and made.from_version == "1.0"
    assert made.size < len(NEW) // 10

    params = await push_to(server, new, "d1", "1.0")
    # The full image's params are those of any push: a device that knows nothing of deltas is served.
    assert (params["version"], params["fileSize"], params["sign"]) == ("2.0", len(NEW), new["sign"])
    d = params["delta"]
    assert (d["from"], d["algorithm"], d["fileSize"], d["signMethod"]) == ("1.0", delta.ALGORITHM, made.size, "sha256")
    async with aiohttp.ClientSession() as http, http.get(d["fileUrl"]) as resp:
        assert resp.status == 200
        patch = await resp.read()
    assert hashlib.sha256(patch).hexdigest() == d["sign"]
    (tmp_path / "old").write_bytes(OLD)
    (tmp_path / "patch").write_bytes(patch)
    delta.apply(tmp_path / "old", tmp_path / "patch", tmp_path / "new", d["algorithm"])
    assert (tmp_path / "new").read_bytes() == NEW
    # Served bytes count as the device's download of the job's firmware.
    task = (await server.call("GET", f"/jobs/{params['jobId']}/tasks", 200))["items"][0]
    assert task["bytesDownloaded"] == made.size


async def test_no_delta_when_off_unknown_source_or_same_version(server: Server) -> None:
    _old, new = await line(server)
    assert "delta" not in await push_to(server, new, "off", "1.0", delta="off")
    assert "delta" not in await push_to(server, new, "unknown", "0.9")  # 0.9 is not stored
    refused = await server.call("POST", "/jobs", 400, json={"firmwareId": new["id"], "delta": "always"})
    assert "delta must be 'auto' or 'off'" in refused["error"]["message"]


async def test_an_image_over_the_limit_gets_no_delta_and_is_still_pushed(tmp_path: Path) -> None:
    async with server_with(tmp_path, delta_max_bytes=100_000) as server:
        old, new = await line(server)
        made = await server.store.get_delta(old["id"], new["id"])
        assert made is not None and made.status == DeltaStatus.FAILED
        assert "over delta_max_bytes" in made.error
        params = await push_to(server, new, "d1", "1.0")
        assert "delta" not in params and params["fileSize"] == len(NEW)


async def sdk_upgrade(
    server: Server, tmp_path: Path, new: dict[str, Any], running: bytes
) -> tuple[dict[str, Any], list[str]]:
    """Upgrade device d1 (on 1.0, flash holding `running`) to `new` with the SDK; its task and log descs."""
    image = tmp_path / "running.bin"
    image.write_bytes(running)
    d = await server.device("d1")
    done: dict[str, Any] = {}

    async def on_upgrade(offer: Offer) -> None:
        path = await device.download(offer, tmp_path / "next.bin", running_image=image)
        assert path.read_bytes() == NEW
        await device.report_version(offer.version)

    device = Device("127.0.0.1", server.mqtt_port, "pk1", "d1", d["deviceSecret"], version="1.0", on_upgrade=on_upgrade)
    async with device:

        async def reported() -> bool:  # the job takes the version the device has reported
            return bool((await server.call("GET", "/products/pk1/devices/d1", 200))["version"] == "1.0")

        await wait_for(reported)
        job = await server.call("POST", "/jobs", 201, json={"firmwareId": new["id"], "scope": {"deviceKeys": ["d1"]}})

        async def succeeded() -> bool:
            task = (await server.call("GET", f"/jobs/{job['id']}/tasks", 200))["items"][0]
            done.update(task)
            return bool(task["status"] == "succeeded")

        await wait_for(succeeded)
    log = await server.call("GET", f"/events?jobId={job['id']}", 200)
    descs = [json.loads(row).get("desc") or "" for row in log.decode().splitlines()]
    return done, descs


async def test_the_sdk_rebuilds_from_the_delta_and_says_so(server: Server, tmp_path: Path) -> None:
    _old, new = await line(server)
    task, descs = await sdk_upgrade(server, tmp_path, new, OLD)
    made = [d for d in descs if "rebuilt from a delta" in d]
    assert made, descs
    assert task["bytesDownloaded"] < len(NEW) // 10  # only the delta travelled


async def test_a_corrupt_delta_falls_back_to_the_full_image(server: Server, tmp_path: Path) -> None:
    old, new = await line(server)
    made = await server.store.get_delta(old["id"], new["id"])
    assert made is not None
    path = server.services.deltas.path_of(made)
    path.chmod(0o644)
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))  # same size, every byte wrong
    task, descs = await sdk_upgrade(server, tmp_path, new, OLD)
    assert any("delta failed" in d and "downloaded the full image" in d for d in descs), descs
    assert task["bytesDownloaded"] == made.size + len(NEW)  # the broken delta, then the image


async def test_a_device_whose_flash_differs_falls_back_too(server: Server, tmp_path: Path) -> None:
    # The patch applies, but to other bytes: the rebuilt image fails the full image's sign.
    _old, new = await line(server)
    task, descs = await sdk_upgrade(server, tmp_path, new, random.Random(1).randbytes(len(OLD)))
    assert any("delta failed" in d for d in descs), descs
    assert task["status"] == "succeeded"


@pytest.mark.parametrize("algorithm", delta.FORMATS)
def test_delta_cli_round_trip(tmp_path: Path, algorithm: str) -> None:
    from otabox.cli import main

    (tmp_path / "a").write_bytes(OLD)
    (tmp_path / "b").write_bytes(NEW)
    pick = ["--algorithm", algorithm]
    assert main(["delta", "make", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "p"), *pick]) == 0
    assert main(["delta", "apply", str(tmp_path / "a"), str(tmp_path / "p"), str(tmp_path / "c"), *pick]) == 0
    assert (tmp_path / "c").read_bytes() == NEW
    (tmp_path / "p").write_bytes(b"not a patch at all" * 10)
    assert main(["delta", "apply", str(tmp_path / "a"), str(tmp_path / "p"), str(tmp_path / "d"), *pick]) == 1
    assert not (tmp_path / "d").exists()


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(delta.DeltaError, match="unknown delta algorithm"):
        delta.apply(Path("a"), Path("b"), Path("c"), "xdelta3")


async def test_the_simulator_takes_deltas_and_falls_back_for_broken_ones(server: Server) -> None:
    from tests.test_simulate import _all_on, fleet_for

    await server.product("pk1")
    old = await server.firmware("pk1", "1.0.0", OLD, name="main")
    new = await server.firmware("pk1", "2.0.0", NEW, name="main")
    await server.services.deltas.idle()
    made = await server.store.get_delta(old["id"], new["id"])
    assert made is not None and made.status == DeltaStatus.READY
    fleet = await fleet_for(server, {"delta": 3, "delta-broken": 1, "success": 1}, 5)
    run = asyncio.create_task(fleet.run())
    keys = [d.key for d in fleet.devices]
    await wait_for(lambda: _all_on(server, keys, "1.0.0"))
    await server.call("POST", "/jobs", 201, json={"firmwareId": new["id"], "scope": {"deviceKeys": keys}})
    summary = await run
    assert summary["outcomes"] == {"succeeded": 5}
    assert (summary["deltasUsed"], summary["deltaFallbacks"]) == (3, 1)
    served = {d.behaviour: await server.store.downloaded_bytes("pk1", d.key, new["id"]) for d in fleet.devices}
    # A device that knows no deltas takes the full image; a broken delta costs the delta and the image.
    assert served == {"delta": made.size, "delta-broken": made.size + len(NEW), "success": len(NEW)}


async def test_a_delta_over_its_time_is_given_up_and_the_push_goes_out_whole(tmp_path: Path) -> None:
    async with server_with(tmp_path, delta_timeout=0.01) as server:
        _old, new = await line(server)
        shown = (await server.call("GET", f"/firmware/{new['id']}/deltas", 200))["items"]
        assert [(d["status"], d["fromVersion"]) for d in shown] == [("failed", "1.0")]
        assert "delta_timeout" in shown[0]["error"]
        assert "delta" not in await push_to(server, new, "d1", "1.0")
        assert not list((tmp_path / "data" / "firmware" / "tmp").iterdir())  # no half-made patch left


def test_the_maker_is_bounded_in_memory(tmp_path: Path) -> None:
    big = random.Random(3).randbytes(16 << 20)
    (tmp_path / "a").write_bytes(big)
    (tmp_path / "b").write_bytes(big[::-1])
    out = tmp_path / "p"
    # bsdiff4 needs 18x the image: 16 MiB images cannot be diffed in a 200 MB address space.
    argv = ["delta", "make", str(tmp_path / "a"), str(tmp_path / "b"), str(out), "--algorithm", "bsdiff4"]
    argv += ["--max-memory", str(200 << 20)]
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "otabox", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done
    assert "otabox:" in done.stderr and "Traceback" not in done.stderr


async def test_deltas_of_a_deleted_firmware_go_with_it(server: Server) -> None:
    old, new = await line(server)
    made = await server.store.get_delta(old["id"], new["id"])
    assert made is not None
    path = server.services.deltas.path_of(made)
    assert path.exists()
    await server.call("DELETE", f"/firmware/{old['id']}", 204)
    assert await server.store.get_delta(old["id"], new["id"]) is None
    assert not path.exists()
    assert (await server.call("GET", f"/firmware/{new['id']}/deltas", 200))["items"] == []


async def test_the_console_shows_the_deltas_of_a_firmware(server: Server, ui: Console) -> None:  # noqa: F811
    old, new = await line(server)
    made = await server.store.get_delta(old["id"], new["id"])
    assert made is not None
    page = await ui.get(f"/ui/firmware/{new['id']}")
    table = page.partition('id="fw-deltas"')[2].partition("</table>")[0]
    assert "<td>1.0</td><td>ready" in table
    saving = round(100 - 100 * made.size / len(NEW))
    assert f"{saving} %" in table
    assert "None: a delta is made" in await ui.get(f"/ui/firmware/{old['id']}")


async def test_a_server_making_bsdiff4_deltas_serves_sdk_devices_too(tmp_path: Path) -> None:
    async with server_with(tmp_path, delta_algorithm="bsdiff4") as server:
        old, new = await line(server)
        made = await server.store.get_delta(old["id"], new["id"])
        assert made is not None and made.algorithm == "bsdiff4" and made.status == DeltaStatus.READY
        task, descs = await sdk_upgrade(server, tmp_path, new, OLD)
        assert any("rebuilt from a delta" in d for d in descs), descs
        assert task["bytesDownloaded"] == made.size


async def test_a_version_stored_after_it_was_looked_for_gets_its_delta(server: Server) -> None:
    await server.product("pk1")
    new = await server.firmware("pk1", "2.0", NEW, name="main")
    assert "delta" not in await push_to(server, new, "early", "1.0")  # 1.0 is not stored yet
    old = await server.firmware("pk1", "1.0", OLD, name="main")
    assert await server.services.deltas.for_device(await server.services.firmware.get(new["id"]), "1.0") is None
    await server.services.deltas.idle()
    params = await push_to(server, new, "later", "1.0")
    made = await server.store.get_delta(old["id"], new["id"])
    assert made is not None and params["delta"]["fileSize"] == made.size
    # Uploading 1.0 after 2.0 made no delta 2.0 -> 1.0: earlier means a lower version, not an older upload.
    assert (await server.call("GET", f"/firmware/{old['id']}/deltas", 200))["items"] == []
