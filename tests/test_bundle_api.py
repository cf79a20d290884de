"""Signed offline bundles end to end: a vendor's CLI makes one, a site trusts the vendor and imports it,
a device upgrades to it; every tampering or mistake is refused with nothing stored."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otabox import protocol
from tests.conftest import Device, Server
from tests.test_cli import Cli, cli  # noqa: F401  (cli: fixture)

FIRMWARE = os.urandom(150_000)


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1}


async def upload(server: Server, path: Path) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("file", path.read_bytes(), filename=path.name, content_type="application/octet-stream")
    async with server.http.post(server.url + "/api/v1/bundles", data=form) as resp:
        return resp.status, await resp.json()


async def keygen(cli: Cli, folder: Path, name: str = "acme") -> tuple[Path, Path]:  # noqa: F811
    """`otabox keygen` as a vendor runs it: the private key and FILE.pub."""
    folder.mkdir(parents=True, exist_ok=True)
    key = folder / f"{name}.key"
    assert (await cli.raw("keygen", str(key))).rc == 0
    return key, key.with_name(key.name + ".pub")


async def make_bundle(cli: Cli, key: Path, out: Path, *extra: str) -> Path:  # noqa: F811
    """`otabox bundle create` on the vendor's machine: no server involved."""
    image = out.with_suffix(".bin")
    image.write_bytes(FIRMWARE)
    run = await cli.raw(
        "bundle", "create", str(image), "--product", "thermo", "--name", "main", "--version", "2.0.0",
        "--desc", "from the vendor", "--key", str(key), "-o", str(out), *extra,
    )  # fmt: skip
    assert run.rc == 0, run.err
    return out


async def firmware_count(server: Server, pk: str = "thermo") -> int:
    total: int = (await server.call("GET", f"/products/{pk}/firmware", 200))["total"]
    return total


async def test_a_trusted_bundle_is_stored_with_its_publisher_and_a_device_upgrades_to_it(
    server: Server,
    cli: Cli,  # noqa: F811
    tmp_path: Path,
) -> None:
    await server.product("thermo")
    key, public = await keygen(cli, tmp_path)
    bundle = await make_bundle(cli, key, tmp_path / "trip.otb")
    assert (await cli("publisher", "add", "acme", str(public))).rc == 0
    listed = (await server.call("GET", "/publishers", 200))["items"]
    assert [p["name"] for p in listed] == ["acme"]
    run = await cli("bundle", "import", str(bundle), "--json")
    assert run.rc == 0, run.err
    (fw,) = (await server.call("GET", "/products/thermo/firmware", 200))["items"]
    assert fw["publisher"] == "acme" and fw["name"] == "main" and fw["version"] == "2.0.0"
    assert fw["desc"] == "from the vendor" and fw["size"] == len(FIRMWARE)
    secret = (await server.device("d1", "thermo"))["deviceSecret"]
    dev = await Device(server, "thermo", "d1", secret).connect("1.0.0")
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
    params = await dev.push()
    async with server.http.get(params["fileUrl"]) as resp:
        assert await resp.read() == FIRMWARE
    await dev.call(protocol.INFORM, {"version": "2.0.0"})
    assert (await server.call("GET", f"/jobs/{job['id']}/tasks", 200))["items"][0]["status"] == "succeeded"
    await dev.close()
    # The same bundle again: the version exists, nothing more is stored.
    status, body = await upload(server, bundle)
    assert status == 409 and body["error"]["code"] == "duplicate"
    assert await firmware_count(server) == 1


async def test_untrusted_tampered_and_misaddressed_bundles_store_nothing(
    server: Server,
    cli: Cli,  # noqa: F811
    tmp_path: Path,
) -> None:
    await server.product("thermo")
    key, public = await keygen(cli, tmp_path / "acme")
    bundle = await make_bundle(cli, key, tmp_path / "trip.otb")
    status, body = await upload(server, bundle)
    assert status == 403 and "no publisher is trusted" in body["error"]["message"]
    await server.call("POST", "/publishers", 201, json={"name": "acme", "publicKey": public.read_text()})
    evil, _ = await keygen(cli, tmp_path / "evil", "evil")
    foreign = await make_bundle(cli, evil, tmp_path / "foreign.otb")
    status, body = await upload(server, foreign)
    assert status == 403 and body["error"]["code"] == "untrusted"
    raw = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tar:
        offsets = {m.name: m.offset_data for m in tar.getmembers()}
    for member, expected in (("manifest.json", (403, "untrusted")), ("firmware.bin", (400, "bad-bundle"))):
        bad = bytearray(raw)
        bad[offsets[member] + 100] ^= 0x01  # one byte of the manifest, then one of the firmware
        target = tmp_path / f"bad-{member}.otb"
        target.write_bytes(bytes(bad))
        status, body = await upload(server, target)
        assert (status, body["error"]["code"]) == expected, body
    cut = tmp_path / "cut.otb"
    cut.write_bytes(raw[: len(raw) // 3])
    status, body = await upload(server, cut)
    assert status == 400 and body["error"]["code"] == "bad-bundle"
    # Two firmware for one trip, the second for a product this site does not have: all refused.
    other = tmp_path / "valve.bin"
    other.write_bytes(b"valve firmware")
    two = await make_bundle(cli, key, tmp_path / "two.otb", "--add", f"valve:main:1.0:{other}")
    status, body = await upload(server, two)
    assert status == 400 and "'valve', which does not exist" in body["error"]["message"]
    assert await firmware_count(server) == 0
    assert sorted(p.name for p in (server.data_dir / "firmware").rglob("*") if p.is_file()) == []


async def test_the_console_imports_a_bundle_and_shows_its_publisher(
    server: Server,
    cli: Cli,  # noqa: F811
    tmp_path: Path,
) -> None:
    from tests.test_console import Console

    await server.product("thermo")
    key, public = await keygen(cli, tmp_path)
    bundle = await make_bundle(cli, key, tmp_path / "trip.otb")
    await server.call("POST", "/publishers", 201, json={"name": "acme", "publicKey": public.read_text()})
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        ui = Console(server, http)
        assert (await ui.sign_in()).status == 303
        page = await ui.get("/ui/firmware?product=thermo")
        assert "Import a signed bundle" in page and "acme" in page
        form = aiohttp.FormData()
        form.add_field("file", bundle.read_bytes(), filename="trip.otb", content_type="application/octet-stream")
        location = await ui.post("/ui/bundles", form, expect=303)
        page = await ui.get(location)
        assert "Imported from acme: thermo main 2.0.0" in page and "bundle of acme" in page
        form = aiohttp.FormData()
        form.add_field("file", bundle.read_bytes(), filename="trip.otb", content_type="application/octet-stream")
        location = await ui.post("/ui/bundles", form, expect=303)
        assert "Bundle refused" in await ui.get(location) and await firmware_count(server) == 1
        (fw,) = (await server.call("GET", "/products/thermo/firmware", 200))["items"]
        assert "a signed bundle of acme" in await ui.get(f"/ui/firmware/{fw['id']}")
