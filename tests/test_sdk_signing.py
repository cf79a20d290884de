"""The device SDK checks the server's Ed25519 signature when it was given the server's public key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from otabox.device import FailureCode, Offer, VerificationFailed, fetch_signing_key
from tests.conftest import Server
from tests.jobhooks import Recorder, offer_params
from tests.test_device_sdk import make_device, recorder  # noqa: F401  (recorder: fixture)

FIRMWARE = os.urandom(100_000)


@pytest.fixture
def server_settings(tmp_path: Path) -> dict[str, Any]:
    return {"signing_key": str(tmp_path / "signing.pem")}


async def test_a_signed_image_is_accepted_and_the_desc_says_so(
    server: Server,
    recorder: Recorder,  # noqa: F811
    tmp_path: Path,
) -> None:
    key = await fetch_signing_key(server.url)  # public: no token
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    async with await make_device(server, signing_key=key) as device:
        offer = Offer.from_params(await offer_params(server, fw, "d1", signature=fw["signature"]))
        path = await device.download(offer, tmp_path / "fw.bin")
        assert path.read_bytes() == FIRMWARE
        await recorder.wait(lambda: any("signature verified" in (desc or "") for _dk, _s, desc in recorder.progress))


@pytest.mark.parametrize("signature", ["", "tampered"])
async def test_a_missing_or_wrong_signature_is_refused_with_step_minus_3(
    server: Server,
    recorder: Recorder,  # noqa: F811
    tmp_path: Path,
    signature: str,
) -> None:
    key = (await server.call("GET", "/signing-key", 200))["pem"]
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    other = await server.firmware("pk1", "2.0.1", FIRMWARE + b"!", name="other")
    bad = {"": "", "tampered": other["signature"]}[signature]  # a real signature, of another file
    async with await make_device(server, signing_key=key) as device:
        offer = Offer.from_params(await offer_params(server, fw, "d1", signature=bad))
        with pytest.raises(VerificationFailed) as err:
            await device.download(offer, tmp_path / "fw.bin")
        assert err.value.code == FailureCode.VERIFY and err.value.reported
        await recorder.wait(lambda: -3 in recorder.steps("d1"))
        assert not (tmp_path / "fw.bin").exists() and not (tmp_path / "fw.bin.part").exists()


def test_a_bad_key_is_refused_at_once() -> None:
    from otabox.device import Device

    with pytest.raises(ValueError, match="Ed25519"):
        Device("127.0.0.1", 1, "pk", "dk", "secret-123", version="1", signing_key="not a key")


async def test_the_example_device_provisions_the_key_and_upgrades_to_signed_firmware(
    server: Server, tmp_path: Path
) -> None:
    import asyncio
    import json
    import sys

    from tests.conftest import wait_for

    await server.product("pk1")
    secret = (await server.device("ex1"))["deviceSecret"]
    fw = await server.firmware("pk1", "2.0.0", FIRMWARE)
    slots = tmp_path / "slots"
    example = Path(__file__).resolve().parent.parent / "examples" / "device.py"
    args = ["--port", str(server.mqtt_port), "--product", "pk1", "--device", "ex1", "--secret", secret]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(example), *args, "--slots", str(slots), "--trust-server", server.url, "--reboot-time", "0.1"
    )
    try:

        async def online() -> bool:
            return bool((await server.call("GET", "/products/pk1/devices/ex1", 200))["online"])

        await wait_for(online, timeout=30)
        job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})

        async def done() -> bool:
            return bool((await server.call("GET", f"/jobs/{job['id']}", 200))["status"] == "completed")

        await wait_for(done, timeout=30)
        assert (slots / "signing-key.pub").read_text().strip() == (await fetch_signing_key(server.url))
        assert json.loads((slots / "state.json").read_text())["version"] == "2.0.0"
        active = json.loads((slots / "state.json").read_text())["active"]
        assert (slots / active / "firmware.bin").read_bytes() == FIRMWARE
    finally:
        proc.terminate()
        await proc.wait()
