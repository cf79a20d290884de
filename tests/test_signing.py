"""Signed firmware: an Ed25519 signature per file, carried in pushes and offers (spec 3.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from otabox.device.download import VerifyError, load_public_key, verify_signature
from tests.conftest import Device, Server


def verify_file_signature(public_key: str, data: bytes, signature: str, tmp_path: Path) -> bool:
    """Check a signature the way a device does (the SDK's own check, on a file)."""
    image = tmp_path / "image.bin"
    image.write_bytes(data)
    try:
        verify_signature(load_public_key(public_key), image, signature)
    except VerifyError:
        return False
    return True


@pytest.fixture
def server_settings(tmp_path: Path) -> dict[str, Any]:
    return {"signing_key": str(tmp_path / "keys" / "signing.pem"), "scheduler_interval": 0.1}


async def test_firmware_is_signed_and_the_signature_reaches_the_device(server: Server, tmp_path: Path) -> None:
    key = await server.call("GET", "/signing-key", 200)
    assert key["algorithm"] == "Ed25519" and key["pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert oct((tmp_path / "keys" / "signing.pem").stat().st_mode & 0o777) == "0o600"
    await server.product("pk1")
    content = bytes(range(256)) * 300
    fw = await server.firmware("pk1", "2.0", content)
    assert verify_file_signature(key["publicKey"], content, fw["signature"], tmp_path)
    assert verify_file_signature(key["pem"], content, fw["signature"], tmp_path)
    assert not verify_file_signature(key["publicKey"], content + b"!", fw["signature"], tmp_path)

    dev = Device(server, "pk1", "d1", (await server.device("d1"))["deviceSecret"])
    await dev.connect("1.0")
    await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
    params = await dev.push()
    async with server.http.get(params["fileUrl"]) as resp:
        body = await resp.read()
    assert verify_file_signature(key["publicKey"], body, params["signature"], tmp_path)
    await dev.close()


async def test_the_public_key_needs_no_token(server: Server) -> None:
    async with server.http.get(server.url + "/api/v1/signing-key", headers={"Authorization": ""}) as resp:
        assert resp.status == 200 and (await resp.json())["algorithm"] == "Ed25519"
    # Everything else under /api/v1 still does.
    async with server.http.get(server.url + "/api/v1/products", headers={"Authorization": ""}) as resp:
        assert resp.status == 401


async def test_the_key_survives_a_restart(server: Server, tmp_path: Path) -> None:
    from tests.conftest import start_server

    first = (await server.call("GET", "/signing-key", 200))["publicKey"]
    await server.app.stop()
    again = await start_server(tmp_path, signing_key=str(tmp_path / "keys" / "signing.pem"))
    try:
        signer = again.services.signer if again.services else None
        assert signer is not None and signer.public_key_b64 == first
    finally:
        await again.stop()
