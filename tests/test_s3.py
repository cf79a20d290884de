"""Firmware in S3-compatible storage (`--storage-url`, `--storage-presign`) against a real S3 server
(SeaweedFS, scripts/s3): uploads go to the bucket (multipart past one part) before the record
commits, the node serves downloads from its cache filled from the bucket (Range works), presigned
fileUrls send devices to the bucket itself, deletion removes the object; a storage that is down
or refuses the keys is a clear error and nothing is kept."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otabox import protocol
from otabox.errors import StorageUnavailable
from otabox.server import s3 as s3_module
from otabox.server.app import App
from otabox.server.s3 import StorageConfigError
from otabox.server.settings import Settings, SettingsError, load
from tests.conftest import TOKEN, Device, Server, stop_within, wait_for
from tests.s3 import S3

# Each test keeps its objects under a prefix of its own in the session's bucket.
_prefixes = itertools.count(1)


def storage_url(s3: S3, prefix: str) -> str:
    return f"s3://{s3.bucket}/{prefix}?endpoint={s3.endpoint}"


async def start(tmp_path: Path, s3: S3, prefix: str, env: dict[str, str] | None = None, **settings: Any) -> App:
    values: dict[str, Any] = {"data_dir": str(tmp_path / "data"), "host": "127.0.0.1", "http_port": 0, "mqtt_port": 0}
    values.update(storage_url=storage_url(s3, prefix), **settings)
    app = App(Settings(**values), env={"OTABOX_ADMIN_TOKEN": TOKEN, **(s3.env if env is None else env)})
    await app.start()
    return app


@pytest.fixture
async def bucket_server(tmp_path: Path, s3_server: S3) -> AsyncIterator[tuple[Server, str]]:
    prefix = f"t{next(_prefixes)}-{os.getpid()}"
    app = await start(tmp_path, s3_server, prefix, scheduler_interval=0.1)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            yield Server(app, http, f"http://127.0.0.1:{app.http_port}", tmp_path / "data"), prefix
    finally:
        await stop_within(app)


def in_bucket(s3: S3, prefix: str) -> dict[str, int]:
    listed = s3.client().list_objects(s3.bucket, prefix=prefix + "/", recursive=True)
    return {o.object_name: o.size for o in listed}


async def test_firmware_goes_to_the_bucket_and_is_served_from_it(
    bucket_server: tuple[Server, str], s3_server: S3
) -> None:
    server, prefix = bucket_server
    # Past one part (16 MiB): a multipart upload.
    content = os.urandom(s3_module.PART_SIZE + 123_457)
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", content)
    name = f"{prefix}/{fw['sha256'][:2]}/{fw['sha256']}"
    assert in_bucket(s3_server, prefix) == {name: len(content)}
    assert s3_server.sha256_of(name) == hashlib.sha256(content).hexdigest()
    assert fw["sha256"] == hashlib.sha256(content).hexdigest()

    # A node without the file in its folder (a new node, a lost disk) fetches it from the bucket.
    cached = server.data_dir / "firmware" / fw["sha256"][:2] / fw["sha256"]
    cached.unlink()
    await server.device("d1")
    url = (await server.call("GET", f"/firmware/{fw['id']}/url?deviceKey=d1", 200))["fileUrl"]
    assert url.startswith(server.url)  # served by the node: --storage-presign is off
    async with server.http.get(url, headers={"Range": "bytes=100-199"}) as resp:
        assert resp.status == 206
        assert await resp.read() == content[100:200]
    assert cached.is_file()
    async with server.http.get(url) as resp:
        assert resp.status == 200 and hashlib.sha256(await resp.read()).hexdigest() == fw["sha256"]

    # A second record of the same content shares the object; deleting one keeps it, the last removes it.
    again = await server.firmware("pk1", "2.1", content)
    assert again["sha256"] == fw["sha256"] and len(in_bucket(s3_server, prefix)) == 1
    await server.call("DELETE", f"/firmware/{fw['id']}", 204)
    assert in_bucket(s3_server, prefix) == {name: len(content)}
    await server.call("DELETE", f"/firmware/{again['id']}", 204)
    assert in_bucket(s3_server, prefix) == {}
    assert not cached.exists()


async def test_presigned_file_urls_send_devices_to_the_bucket(tmp_path: Path, s3_server: S3) -> None:
    prefix = f"presign-{os.getpid()}"
    app = await start(tmp_path, s3_server, prefix, scheduler_interval=0.1, storage_presign=True)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            server = Server(app, http, f"http://127.0.0.1:{app.http_port}", tmp_path / "data")
            content = os.urandom(300_000)
            await server.product("pk1")
            fw = await server.firmware("pk1", "2.0", content)
            secret = (await server.device("d1"))["deviceSecret"]
            device = await Device(server, "pk1", "d1", secret).connect("1.0")
            job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
            params = await device.push()
            url = params["fileUrl"]
            assert url.startswith(f"{s3_server.endpoint}/{s3_server.bucket}/{prefix}/") and "X-Amz-Signature=" in url
            async with aiohttp.ClientSession() as anonymous:  # what a device has: the URL, no token
                async with anonymous.get(url, headers={"Range": "bytes=10-19"}) as resp:
                    assert resp.status == 206 and await resp.read() == content[10:20]
                async with anonymous.get(url) as resp:
                    assert resp.status == 200 and hashlib.sha256(await resp.read()).hexdigest() == fw["sha256"]
                    assert fw["fileName"] in resp.headers.get("Content-Disposition", "")
                tampered = url.replace(fw["sha256"], "0" * 64)
                async with anonymous.get(tampered) as resp:
                    assert resp.status == 403  # the signature covers the object's name
            assert (await device.call(protocol.PROGRESS, {"step": "50"}))["code"] == 200
            assert (await device.call(protocol.INFORM, {"version": "2.0"}))["code"] == 200

            async def succeeded() -> bool:
                state = await server.call("GET", f"/jobs/{job['id']}", 200)
                return bool(state["counts"]["succeeded"] == 1)

            assert await wait_for(succeeded)
            await device.close()
    finally:
        await stop_within(app)


async def test_a_storage_that_is_down_refuses_uploads_and_keeps_nothing(tmp_path: Path) -> None:
    own = S3.start()  # a server of this test's own: it is stopped halfway
    try:
        app = await start(tmp_path, own, "down")
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                server = Server(app, http, f"http://127.0.0.1:{app.http_port}", tmp_path / "data")
                await server.product("pk1")
                kept = await server.firmware("pk1", "1.0", b"kept " * 1000)
                await server.device("d1")
                url = (await server.call("GET", f"/firmware/{kept['id']}/url?deviceKey=d1", 200))["fileUrl"]
                (server.data_dir / "firmware" / kept["sha256"][:2] / kept["sha256"]).unlink()
                own.stop()

                form = aiohttp.FormData()
                form.add_field("name", "fw")
                form.add_field("version", "2.0")
                form.add_field("file", b"new firmware " * 1000, filename="fw.bin")
                refused = await server.call("POST", "/products/pk1/firmware", 503, data=form)
                assert refused["error"]["code"] == "storage-unavailable"
                assert own.endpoint.removeprefix("http://") in refused["error"]["message"]
                listed = await server.call("GET", "/products/pk1/firmware", 200)
                assert [f["version"] for f in listed["items"]] == ["1.0"]  # nothing registered
                stored = [p for p in (server.data_dir / "firmware").glob("??/*")]
                assert stored == []  # nothing left on the node's disk either
                # A download the node cannot fill from the bucket: a clear 503, not a missing file.
                async with http.get(url) as resp:
                    assert resp.status == 503
                    assert (await resp.json())["error"]["code"] == "storage-unavailable"
                assert (await server.call("GET", "/products/pk1/firmware", 200))["total"] == 1  # reads go on
        finally:
            await stop_within(app)
    finally:
        own.stop()


async def test_start_refuses_bad_storage_settings(tmp_path: Path, s3_server: S3) -> None:
    with pytest.raises(StorageUnavailable, match=r"AccessDenied|SignatureDoesNotMatch|InvalidAccessKeyId"):
        await start(tmp_path / "a", s3_server, "x", env={**s3_server.env, "AWS_SECRET_ACCESS_KEY": "wrong" * 8})
    with pytest.raises(StorageConfigError, match="AWS_ACCESS_KEY_ID"):
        await start(tmp_path / "b", s3_server, "x", env={})
    no_bucket = f"s3://no-such-bucket/x?endpoint={s3_server.endpoint}"
    with pytest.raises(StorageUnavailable, match="does not exist"):
        app = App(
            Settings(data_dir=str(tmp_path / "c"), host="127.0.0.1", http_port=0, mqtt_port=0, storage_url=no_bucket),
            env={"OTABOX_ADMIN_TOKEN": TOKEN, **s3_server.env},
        )
        await app.start()
    for bad, message in (
        ("http://bucket/x", "expected s3://"),
        ("s3://bucket/x?endpoint=ftp://h:1", "must be http"),
        ("s3://bucket/x?endpoint=http://h:1&color=red", "unknown parameter 'color'"),
        ("s3://Bad_Bucket/x", "not a bucket name"),
    ):
        with pytest.raises(SettingsError, match=message):
            load(env={"OTABOX_STORAGE_URL": bad})
    with pytest.raises(SettingsError, match="storage_presign needs storage_url"):
        load(env={"OTABOX_STORAGE_PRESIGN": "true"})


async def test_an_install_started_with_storage_puts_its_files_there(tmp_path: Path, s3_server: S3) -> None:
    """An all-in-one install that adds --storage-url: its firmware goes to the bucket at the next start."""
    plain = App(
        Settings(data_dir=str(tmp_path / "data"), host="127.0.0.1", http_port=0, mqtt_port=0),
        env={"OTABOX_ADMIN_TOKEN": TOKEN},
    )
    await plain.start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            old = Server(plain, http, f"http://127.0.0.1:{plain.http_port}", tmp_path / "data")
            await old.product("pk1")
            fw = await old.firmware("pk1", "1.0", b"old firmware " * 5000)
    finally:
        await stop_within(plain)
    prefix = f"moved-{os.getpid()}"
    app = await start(tmp_path, s3_server, prefix)
    await stop_within(app)
    assert in_bucket(s3_server, prefix) == {f"{prefix}/{fw['sha256'][:2]}/{fw['sha256']}": fw["size"]}
