"""`otabox db copy`: a real all-in-one install (SQLite, mid-rollout) into a real PostgreSQL,
nothing lost: every row, the upgrade log in order, identity columns going on after the copy;
refused into a database that is not empty and from a data dir a server is running on."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otabox.cli import main
from otabox.server.app import App
from otabox.server.settings import Settings
from otabox.server.store import Store
from tests.conftest import TOKEN, Device, Server, start_server, stop_within, wait_for
from tests.s3 import S3

# The source is an all-in-one install: its `server` is on SQLite whatever OTABOX_TEST_BACKENDS says.
pytestmark = pytest.mark.sqlite_only


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1}


async def test_a_copied_install_has_every_row(server: Server, postgres_url: str, capsys: Any) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"firmware 2.0 " * 1000)
    secrets = {dk: (await server.device(dk, tags={"site": "lab"}))["deviceSecret"] for dk in ("d1", "d2", "d3")}
    d1 = await Device(server, "pk1", "d1", secrets["d1"]).connect("1.0")
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
    await d1.upgrade()

    async def d1_done() -> bool:
        task = await server.store.active_task("pk1", "d1")
        return task is None

    await wait_for(d1_done)
    await server.call(
        "POST",
        "/webhooks",
        201,
        json={"url": "http://127.0.0.1:9/hook", "events": ["job.completed"], "secret": "s" * 20},
    )
    await server.call(
        "POST", "/users", 201, json={"username": "alice", "role": "operator", "password": "pw-alice-123456"}
    )
    await d1.close()
    source = server.store

    async def d1_offline() -> bool:
        device = await source.get_device("pk1", "d1")
        return device is not None and not device.online

    await wait_for(d1_offline)  # the snapshot below is what the stopped server leaves
    before: dict[str, Any] = {
        "events": [e async for e in source.iter_events()],
        "devices": (await source.list_devices("pk1"))[0],
        "job": await source.get_job(job["id"]),
        "tasks": (await source.list_tasks(job["id"], None, 100, 0))[0],
        "audit": (await source.audit_page(None, None, None, 100, 0))[0],
        "users": await source.list_users(),
        "webhooks": await source.list_webhooks(),
        "firmware": await source.get_firmware(fw["id"]),
        "kv": await source._all("SELECT key, value FROM kv ORDER BY key"),
    }
    await server.app.stop()
    capsys.readouterr()

    argv = ["db", "copy", "--from", str(server.data_dir), "--to", postgres_url, "--json"]
    assert await asyncio.to_thread(main, argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checked"] and summary["tables"]["events"]["rows"] == len(before["events"])
    assert summary["tables"]["devices"]["rows"] == 3 and summary["tables"]["users"]["rows"] == len(before["users"])

    copied = await Store.open(postgres_url)
    try:
        after: dict[str, Any] = {
            "events": [e async for e in copied.iter_events()],
            "devices": (await copied.list_devices("pk1"))[0],
            "job": await copied.get_job(job["id"]),
            "tasks": (await copied.list_tasks(job["id"], None, 100, 0))[0],
            "audit": (await copied.audit_page(None, None, None, 100, 0))[0],
            "users": await copied.list_users(),
            "webhooks": await copied.list_webhooks(),
            "firmware": await copied.get_firmware(fw["id"]),
            "kv": await copied._all("SELECT key, value FROM kv ORDER BY key"),
        }
        assert {k: v for k, v in after.items() if k != "kv"} == {k: v for k, v in before.items() if k != "kv"}
        # The same kv, and the data dir's keys now shared for the cluster's nodes.
        shared = [tuple(r) for r in after["kv"] if r["key"] == "shared_keys"]
        assert [tuple(r) for r in after["kv"] if r["key"] != "shared_keys"] == [tuple(r) for r in before["kv"]]
        assert len(shared) == 1 and json.loads(shared[0][1])["server.key"]
        # The identity columns go on after the copied rows.
        await copied.create_devices("pk1", [("d4", "enc", "sign", {})])
        await copied.delete_device("pk1", "d2")  # its pending task ends canceled: a new event
        last = [e async for e in copied.iter_events()][-1]
        assert last.seq > before["events"][-1].seq and last.device_key == "d2"
    finally:
        await copied.close()

    assert await asyncio.to_thread(main, argv) == 1  # not empty any more: refused, nothing changed
    assert "not empty" in capsys.readouterr().err


async def test_a_copied_install_carries_on_on_postgresql(server: Server, postgres_url: str, tmp_path: Path) -> None:
    """The same data dir (firmware, keys) with the copied database: devices log in with their old
    secrets, the running job goes on and completes, its upgrade log continues the copied one."""
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"firmware 2.0 " * 1000)
    secrets = {dk: (await server.device(dk))["deviceSecret"] for dk in ("d1", "d2")}
    d1 = await Device(server, "pk1", "d1", secrets["d1"]).connect("1.0")
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
    await d1.upgrade()
    await wait_for(lambda: _task_status(server, job["id"], "d1", "succeeded"))
    await d1.close()
    log_before = (await server.call("GET", f"/events?jobId={job['id']}", 200)).decode()
    await server.app.stop()
    argv = ["db", "copy", "--from", str(server.data_dir), "--to", postgres_url, "--json"]
    assert await asyncio.to_thread(main, argv) == 0

    again = await start_server(tmp_path, database_url=postgres_url, scheduler_interval=0.1)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            moved = Server(again, http, f"http://127.0.0.1:{again.http_port}", server.data_dir)
            assert moved.store.dialect == "postgresql"
            d2 = await Device(moved, "pk1", "d2", secrets["d2"]).connect("1.0")
            params = await d2.upgrade()
            async with http.get(params["fileUrl"]) as resp:  # the firmware file is still in the data dir
                assert hashlib.sha256(await resp.read()).hexdigest() == fw["sha256"]

            async def completed() -> bool:
                return bool((await moved.call("GET", f"/jobs/{job['id']}", 200))["status"] == "completed")

            assert await wait_for(completed)
            log_after = (await moved.call("GET", f"/events?jobId={job['id']}", 200)).decode()
            assert log_after.startswith(log_before.rstrip("\n"))  # the copied log, then what came after
            await d2.close()
    finally:
        await stop_within(again)


async def test_a_copied_install_moves_into_postgresql_and_s3(
    server: Server, postgres_url: str, s3_server: S3, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    """`--storage-url`: the firmware files go into the bucket and the keys into the database, each
    file read back and checked; a node on a new, empty data dir then serves the old devices."""
    await server.product("pk1")
    image = os.urandom(200_000)
    fw = await server.firmware("pk1", "2.0", image)
    secret = (await server.device("d1"))["deviceSecret"]
    await server.app.stop()
    capsys.readouterr()
    prefix = f"copied-{os.getpid()}"
    storage = f"s3://{s3_server.bucket}/{prefix}?endpoint={s3_server.endpoint}"
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    argv = ["db", "copy", "--from", str(server.data_dir), "--to", postgres_url, "--storage-url", storage, "--json"]
    assert await asyncio.to_thread(main, argv) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert files == {"count": 1, "bytes": len(image), "where": files["where"], "checked": True}
    assert s3_server.sha256_of(s3_server.key(fw["sha256"], prefix)) == fw["sha256"]

    fresh = tmp_path / "fresh"  # nothing of the old data dir: keys and files come from the cluster
    settings = Settings(data_dir=str(fresh), host="127.0.0.1", http_port=0, mqtt_port=0, scheduler_interval=0.1)
    node = App(
        settings.replace(database_url=postgres_url, storage_url=storage),
        env={"OTABOX_ADMIN_TOKEN": TOKEN, **s3_server.env},
    )
    await node.start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            moved = Server(node, http, f"http://127.0.0.1:{node.http_port}", fresh)
            d1 = await Device(moved, "pk1", "d1", secret).connect("1.0")  # the old secret still opens
            await moved.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
            params = await d1.upgrade()
            async with http.get(params["fileUrl"]) as resp:
                assert resp.status == 200 and await resp.read() == image
            await d1.close()
            assert await moved.store._all("SELECT sha256 FROM file_chunks") == []  # the files are in S3 only
    finally:
        await stop_within(node)


async def test_a_storage_that_is_down_leaves_the_copy_to_the_first_node(
    server: Server, postgres_url: str, s3_server: S3, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    await server.product("pk1")
    fw = await server.firmware("pk1", "2.0", b"firmware 2.0 " * 1000)
    await server.app.stop()
    capsys.readouterr()
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"s3://{s3_server.bucket}/down?endpoint=http://127.0.0.1:{s.getsockname()[1]}"
    argv = ["db", "copy", "--from", str(server.data_dir), "--to", postgres_url, "--storage-url", dead]
    assert await asyncio.to_thread(main, argv) == 1
    err = capsys.readouterr().err
    assert "storage-unavailable" not in err and "firmware storage" in err
    assert "the database is copied and checked" in err and "start the first node on this data dir" in err

    prefix = f"after-{os.getpid()}"
    storage = f"s3://{s3_server.bucket}/{prefix}?endpoint={s3_server.endpoint}"
    settings = Settings(data_dir=str(server.data_dir), host="127.0.0.1", http_port=0, mqtt_port=0)
    node = App(
        settings.replace(database_url=postgres_url, storage_url=storage),
        env={"OTABOX_ADMIN_TOKEN": TOKEN, **s3_server.env},
    )
    await node.start()
    await stop_within(node)
    assert s3_server.sha256_of(s3_server.key(fw["sha256"], prefix)) == fw["sha256"]


def test_storage_url_needs_a_data_dir(tmp_path: Path, capsys: Any) -> None:
    db = tmp_path / "otabox.db"
    db.write_bytes(b"")
    argv = ["db", "copy", "--from", str(db), "--to", "postgresql://u@127.0.0.1/x", "--storage-url", "s3://b/p"]
    assert main(argv) == 2
    assert "needs --from to be the data dir" in capsys.readouterr().err
    argv[-1] = "s3://b/p?endpoint=ftp://x"
    argv[3] = str(tmp_path)
    assert main(argv) == 2
    assert "must be http" in capsys.readouterr().err


async def _task_status(server: Server, job_id: str, dk: str, status: str) -> bool:
    tasks = await server.call("GET", f"/jobs/{job_id}/tasks", 200)
    return any(t["deviceKey"] == dk and t["status"] == status for t in tasks["items"])


async def test_a_running_servers_data_dir_is_refused(server: Server, postgres_url: str, capsys: Any) -> None:
    await server.product("pk1")
    argv = ["db", "copy", "--from", str(server.data_dir), "--to", postgres_url]
    assert await asyncio.to_thread(main, argv) == 1
    assert "in use by another otabox server" in capsys.readouterr().err


def test_the_source_must_exist_and_the_target_be_postgresql(tmp_path: Path, capsys: Any) -> None:
    assert main(["db", "copy", "--from", str(tmp_path), "--to", "postgresql://u@127.0.0.1/x"]) == 1
    assert "no database" in capsys.readouterr().err
    assert main(["db", "copy", "--from", str(tmp_path), "--to", str(tmp_path / "other.db")]) == 2
